#!/usr/bin/env bash
# The GPU check: everything k3batch measures on a GPU, in one run of a few minutes.
#
#   bash benchmarks/device_check.sh            # on a CUDA machine: full size, 1024x1024
#   bash benchmarks/device_check.sh --small    # CPU smoke run (tiny model; the test suite runs it)
#
# Steps, each with its own time limit so one that hangs or breaks leaves the others' results:
#   1. gpu_bench.py: base (50 steps, guidance 3) and Flash, k3batch vs diffusers'
#      Kandinsky3Pipeline on the same GPU: img/s, per-stage seconds, MFU;
#   2. precision_drift.py: bfloat16 / TF32 / reference dtype_map images against float32 (PSNR);
#   3. gpu_bench.py --compile: the same base run with torch.compile (k3batch only);
#   4. gpu_bench.py --scheduler: the base run with a diffusers solver at the steps it needs
#      (SOLVER, SOLVER_STEPS; see docs/models-and-numerics.md, Schedulers; k3batch only);
#   5. gpu_bench.py --members kandinsky2.2: Kandinsky 2.2 at 768x768 (prior 25 steps, decoder
#      100, guidance 4), k3batch vs diffusers' KandinskyV22CombinedPipeline;
#   6. gpu_bench.py --members kandisuperres-x4: KandiSuperRes x4 of a 1024x1024 image (4096x4096
#      out, 25 windows x 5 steps, float16), windows batched 4 per UNet call vs 1.
# Results land in $OUT (default out/device_check) as JSON, with one log, check.log.
# The GPU test machine has no diffusers: a wheel in .whl/ is installed to a private folder.
set -uo pipefail
cd "$(dirname "$0")/.."
small=0
[ "${1:-}" = "--small" ] && small=1
out="${OUT:-out/device_check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
log="$out/check.log"
: >"$log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$python" -c "import diffusers" 2>/dev/null; then
  site="${TMPDIR:-/tmp}/k3batch-device-site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl >>"$log" 2>&1 || { echo "wheel install failed" | tee -a "$log"; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() { # name seconds command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - start))s" | tee -a "$log"
  return 0
}

if [ "$small" = 1 ]; then
  # One process for both families (the imports are most of a small run).
  step bench 300 "$python" benchmarks/gpu_bench.py --small \
    --members kandinsky3,kandinsky3-flash,kandinsky2.2,kandisuperres-x4 --json "$out/bench.json"
  step drift 300 "$python" benchmarks/precision_drift.py --small --json "$out/drift.json"
else
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$python" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  } >>"$log" 2>&1
  step bench "${BENCH_S:-170}" "$python" benchmarks/gpu_bench.py --json "$out/bench.json"
  step drift "${DRIFT_S:-110}" "$python" benchmarks/precision_drift.py --json "$out/drift.json"
  # Inductor's cache outlives the step: a rerun on the same machine picks up where it stopped.
  export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/k3batch-inductor"
  step compile "${COMPILE_S:-150}" "$python" benchmarks/gpu_bench.py --compile --no-baseline \
    --members kandinsky3 --json "$out/bench_compile.json"
  step solver "${SOLVER_S:-90}" "$python" benchmarks/gpu_bench.py --no-baseline --members kandinsky3 \
    --scheduler "${SOLVER:-dpmsolver++}" --steps "${SOLVER_STEPS:-30}" --json "$out/bench_solver.json"
  step k22 "${K22_S:-150}" "$python" benchmarks/gpu_bench.py --members kandinsky2.2 \
    --json "$out/bench_k22.json"
  step superres "${SR_S:-120}" "$python" benchmarks/gpu_bench.py --members kandisuperres-x4 \
    --json "$out/bench_superres.json"
fi
grep -h "img/s\|x$\|PSNR\|rc=" "$log" | tail -40
