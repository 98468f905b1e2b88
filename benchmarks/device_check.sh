#!/usr/bin/env bash
# The GPU check: every figure of issue #26 (speed on GPUs) in one run of at most ~8 minutes.
#
#   bash benchmarks/device_check.sh            # on a CUDA machine: full size, 1024x1024
#   bash benchmarks/device_check.sh --smoke    # CPU: every step on the tiny model
#   bash benchmarks/device_check.sh --small    # CPU: the first GPU check's two runs (gpu_bench
#                                              # and precision_drift) on the tiny model
#   (tests/test_benchmarks.py runs both)
#   STEPS=fp8,k22 bash benchmarks/device_check.sh   # only these steps (a second call)
#
# Steps, in this order, each under its own `timeout` (and the whole under DEADLINE_S, 470 s by
# default on a GPU: a step that would start with under 15 s left is skipped and says so,
# and a step's limit is cut to what is left), each writing
# a JSON line per measurement as it goes, so a run cut short still returns what it measured:
#   eager        gpu_bench: base (50 steps) and Flash, k3batch and diffusers eager (the
#                baseline, re-taken every run: H100 and H200 differ in memory bandwidth)
#   profile      speed_check: one UNet forward and one decode, GPU time by operator group
#                (convolution, GroupNorm, pointwise, layout copies, attention, matmul)
#   compile      speed_check: regional compile of the UNet, cold (fresh Inductor cache):
#                compile seconds, ms per step eager and compiled, recompiles; saves the
#                torch.compiler artifacts
#   compile_warm the same in a new process on the warm cache: warm compile seconds
#   images       gpu_bench: base and Flash, whole images: k3batch compiled and diffusers at
#                its best documented settings (img/s, MFU; the eager ones are the eager step's)
#   fp8          speed_check: FP8 GEMMs, ms per step eager and compiled, epsilon vs bfloat16
#   fp8_drift    precision_drift: FP8 images against bfloat16 ones (PSNR)
#   k22          gpu_bench: Kandinsky 2.2 at 768x768, k3batch (eager, compiled) vs diffusers
#   superres     gpu_bench: KandiSuperRes x4 of a 1024x1024 image, eager and compiled
#   decode       speed_check: MoVQ attention kinds (sdpa, chunked, split_heads), eager and
#                compiled
#   batch        speed_check: eager UNet time per row and step at 1-16 rows per call
#   switches     speed_check: compile variants (channels_last, conv_1x1_as_mm, coordinate
#                descent tuning, cudnn.benchmark, CUDA graphs)
#   artifacts    speed_check: a fresh Inductor cache with the saved artifacts loaded
# Results: $OUT (default out/device_check): results.jsonl (every measurement and a line per
# step), check.log (everything printed), detail.tar.gz (each step's own JSON, full mode).
# The GPU test machine has no diffusers: wheels in .whl/ are installed to a private folder
# (benchmarks/README.md says how to build .whl/).
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
small=0
case "${1:-}" in --smoke) smoke=1 ;; --small) smoke=1 small=1 ;; esac
out="${OUT:-out/device_check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
log="$out/check.log"
results="$out/results.jsonl"
: >"$log"
: >"$results"
deadline=$((SECONDS + ${DEADLINE_S:-$([ "$smoke" = 1 ] && echo 3600 || echo 470)}))
steps=",${STEPS:-bench,drift,eager,profile,compile,compile_warm,images,fp8,fp8_drift,k22,superres,decode,batch,switches,artifacts},"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Each step's own JSON files: under $OUT in smoke mode, else packed into one file at the end
# (the device machine returns at most 8 files).
detail="$out"
[ "$smoke" = 0 ] && detail="${TMPDIR:-/tmp}/k3batch-check-detail" && rm -rf "$detail"
mkdir -p "$detail"

if ! "$python" -c "import diffusers" 2>/dev/null; then
  site="${TMPDIR:-/tmp}/k3batch-device-site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi

# One Inductor/Triton cache for the run: emptied when the cold compile runs, so its figure is
# cold; the steps after it start warm (as a job's actors do after the first).
cache="${TMPDIR:-/tmp}/k3batch-check-cache"
case "$steps" in *,compile,*) rm -rf "$cache" ;; esac
mkdir -p "$cache"
export TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton"

line() { # a JSON line to stdout and results.jsonl
  echo "$1" | tee -a "$results"
}

step() { # name limit command...: runs when STEPS names it, within its limit and the deadline
  local name=$1 limit=$2
  shift 2
  case "$steps" in *",$name,"*) ;; *) return 0 ;; esac
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    line "{\"step\": \"$name\", \"skipped\": \"deadline\", \"left_s\": $left}"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local jsonl="$detail/$name.jsonl" start=$SECONDS
  : >"$jsonl"
  echo "== $name (limit ${limit}s): $*" >>"$log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" --jsonl "$jsonl" >>"$log" 2>&1
  local rc=$?
  cat "$jsonl" >>"$results"
  echo "== $name rc=$rc in $((SECONDS - start))s" >>"$log"
  line "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit, \"timed_out\": $([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false), \"records\": $(wc -l <"$jsonl")}"
}

bench="benchmarks/gpu_bench.py"
speed="benchmarks/speed_check.py"
if [ "$small" = 1 ]; then
  step bench 400 "$python" $bench --small \
    --members kandinsky3,kandinsky3-flash,kandinsky2.2,kandisuperres-x4 --json "$out/bench.json"
  step drift 300 "$python" benchmarks/precision_drift.py --small --json "$out/drift.json"
elif [ "$smoke" = 1 ]; then
  # The tiny model on the CPU: each step's code path, compiled with Dynamo's `eager` backend
  # (Inductor's C++ compile takes minutes per graph on a small CPU; tests/test_speed.py runs
  # it on the tiny model, and the artifacts round trip). SMOKE_LIMIT_S: each step's limit.
  limit=${SMOKE_LIMIT_S:-900}
  step eager $limit "$python" $bench --small --members kandinsky3 --size 32 --steps 2
  step profile $limit "$python" $speed profile --smoke
  step compile $limit "$python" $speed compile --smoke --backend eager --cache cold \
    --save-artifacts "$cache/artifacts.bin"
  step images $limit "$python" $bench --small --members kandinsky3 --size 32 --steps 2 \
    --impls diffusers,k3batch,k3batch-compiled,diffusers-best --compile-backend eager
  step fp8 $limit "$python" $speed fp8 --smoke --backend eager
  step fp8_drift $limit "$python" benchmarks/precision_drift.py --small --steps 2 \
    --variants bfloat16,fp8 --json "$out/drift_fp8.json"
  step decode $limit "$python" $speed decode --smoke --backend eager
  step batch $limit "$python" $speed batch --smoke --batches 1,2
  step switches $limit "$python" $speed compile --smoke --backend eager --variants max
else
  env="{\"step\": \"env\", \"gpu\": \"$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)\", \"versions\": \"$("$python" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1)\"}"
  line "$env"
  step eager 100 "$python" $bench --members kandinsky3,kandinsky3-flash --impls diffusers,k3batch \
    --repeats 2 --json "$detail/eager.json"
  step profile 35 "$python" $speed profile
  step compile 100 "$python" $speed compile --cache cold --save-artifacts "$cache/artifacts.bin"
  step compile_warm 40 "$python" $speed compile --cache warm --iters 5
  step images 150 "$python" $bench --members kandinsky3,kandinsky3-flash --repeats 2 \
    --impls k3batch-compiled,diffusers-best --json "$detail/images.json"
  step fp8 45 "$python" $speed fp8 --cache warm
  step fp8_drift 60 "$python" benchmarks/precision_drift.py --variants bfloat16,fp8 \
    --json "$detail/drift_fp8.json"
  step k22 60 "$python" $bench --members kandinsky2.2 --repeats 1 \
    --impls diffusers,k3batch,k3batch-compiled --json "$detail/k22.json"
  step superres 60 "$python" $bench --members kandisuperres-x4 --repeats 1 \
    --impls k3batch-compiled --json "$detail/superres.json"
  step decode 60 "$python" $speed decode
  step batch 40 "$python" $speed batch
  step switches 150 "$python" $speed compile --cache cold \
    --variants max,channels_last,reduce_overhead,conv_1x1_as_mm,coordinate_descent_tuning,cudnn_benchmark
  # Shipping the compiled model: a fresh Inductor cache, the saved artifacts loaded.
  step artifacts 45 env TORCHINDUCTOR_CACHE_DIR="$cache/fresh-inductor" \
    TRITON_CACHE_DIR="$cache/fresh-triton" "$python" $speed compile --cache artifacts \
    --iters 5 --load-artifacts "$cache/artifacts.bin"
  tar -czf "$out/detail.tar.gz" -C "$detail" . 2>>"$log"
fi
# Last, what the reply's tail shows: the figures side by side, from results.jsonl.
"$python" benchmarks/check_summary.py "$results" 2>&1 | tee -a "$log"
