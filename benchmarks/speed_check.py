"""UNet- and decode-level measurements of the GPU check (`device_check.sh`), one model build
per run, a JSON line after each measurement (stdout and `--jsonl`), so a run cut short still
returns what it measured.

The full-size Kandinsky 3 base UNet and MoVQ (random weights, `tiny_parts.random_components`,
no T5) in bfloat16 at 1024x1024, the UNet called as k3batch calls it (`Denoiser`: the
projected 128-token context, guidance's cond + uncond rows in one forward of twice the batch).

    python benchmarks/speed_check.py profile    # where one UNet forward and one decode spend
                                                # their GPU time, by kind of operator
    python benchmarks/speed_check.py compile    # regional compile: eager ms/step, compile s
                                                # (cold or warm: the cache decides), ms/step
    python benchmarks/speed_check.py compile --variants channels_last,conv_1x1_as_mm,...
                                                # layout and kernel switches under compile
    python benchmarks/speed_check.py fp8        # FP8 GEMMs: ms/step eager and compiled, and
                                                # one forward's epsilon against bfloat16
    python benchmarks/speed_check.py decode     # MoVQ attention kinds, eager and compiled
    python benchmarks/speed_check.py batch      # eager UNet ms per row and step by batch
    python benchmarks/speed_check.py STEP --smoke   # CPU: tiny model, 32x32, float32

Compile variants (`--variants`, in order, each a cold compile of its own graphs): `regional`
(the default settings), `channels_last`, `conv_1x1_as_mm`, `coordinate_descent_tuning`,
`cudnn_benchmark`, `reduce_overhead` (CUDA graphs per block), `max` (channels_last +
conv_1x1_as_mm + coordinate_descent_tuning + cudnn_benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {
    "regional": {},
    "channels_last": {"channels_last": True},
    "conv_1x1_as_mm": {"conv_1x1_as_mm": True},
    "coordinate_descent_tuning": {"coordinate_descent_tuning": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "reduce_overhead": {"mode": "reduce-overhead"},
    "max": {
        "channels_last": True,
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
        "cudnn_benchmark": True,
    },
    "fp8": {"fp8": True},
}
# Operator groups of the profile, first match wins (aten operator names, lower case).
GROUPS = [
    ("attention", ("attention", "flash", "_efficient", "cudnn_attention")),
    ("convolution", ("conv",)),
    ("group_norm", ("group_norm",)),
    ("matmul", ("mm", "linear", "matmul", "gemm", "scaled_mm")),
    ("layout_copy", ("copy_", "contiguous", "clone", "_to_copy", "permute", "transpose", "cat")),
    ("pointwise", ("add", "mul", "silu", "sigmoid", "div", "sub", "exp", "softmax", "where")),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["profile", "compile", "fp8", "decode", "batch"])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, float32, 32x32")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 smoke)")
    p.add_argument("--size", type=int, default=None, help="image side; 1024 (32 smoke)")
    p.add_argument("--batch", type=int, default=None, help="rows (the UNet runs twice as many); 4")
    p.add_argument("--decode-batch", type=int, default=None, help="latents per decode; 4")
    p.add_argument("--iters", type=int, default=None, help="timed calls; 10 (1 smoke)")
    p.add_argument("--batches", default="1,2,4,8,16", help="batch: rows per call to try")
    p.add_argument("--variants", default="regional", help=f"compile: of {', '.join(VARIANTS)}")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--cache", default="", help="label for the records: cold, warm, artifacts")
    p.add_argument("--load-artifacts", default=None, help="torch.compiler artifacts to load")
    p.add_argument("--save-artifacts", default=None, help="write artifacts here after")
    p.add_argument("--jsonl", default=None, help="append each record here")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.size = args.size or (32 if args.smoke else 1024)
    args.batch = args.batch or (1 if args.smoke else 4)
    args.decode_batch = args.decode_batch or (1 if args.smoke else 4)
    args.iters = args.iters or (1 if args.smoke else 10)
    args.variants = args.variants.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    return args


def emit(record: dict, args) -> None:
    """One measurement: a JSON line on stdout and in `--jsonl`."""
    line = json.dumps({"step": args.step, **record}, default=str)
    print(line, flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, args, iters=None) -> float:
    """Median milliseconds of `fn()` over `iters` calls (after the caller's warm-up)."""
    times = []
    for _ in range(iters or args.iters):
        synchronize(args.device)
        start = time.perf_counter()
        fn()
        synchronize(args.device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def first_call_s(fn, args) -> float:
    synchronize(args.device)
    start = time.perf_counter()
    fn()
    synchronize(args.device)
    return time.perf_counter() - start


def rel_error(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ------------------------------------------------------------------ the model
def build(args):
    """(denoiser, movq) of the base member, random weights, on the device in `--dtype`."""
    import torch

    from k3batch.model import family
    from k3batch.model.kandinsky3.denoiser import Denoiser
    from k3batch.model.loading import DTYPES
    from k3batch.testing.tiny_parts import random_components

    start = time.perf_counter()
    parts = random_components(
        "tiny" if args.smoke else "full",
        args.device,
        DTYPES[args.dtype],
        members=(family.BASE,),
        text_encoder=False,
    )
    unet, null = parts["unets"][family.BASE]
    denoiser = Denoiser(family.MEMBERS[family.BASE], unet, null)
    synchronize(args.device)
    emit({"event": "built", "seconds": time.perf_counter() - start, **environment(args)}, args)
    torch.manual_seed(0)
    return denoiser, parts["movq"]


def environment(args) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "size": args.size,
        "unet_batch": 2 * args.batch,
    }


def unet_call(denoiser, args):
    """`step(t)`: one guided UNet forward for `args.batch` rows at timestep t."""
    import torch

    b, latent = 2 * args.batch, args.size // 8
    g = torch.Generator(args.device).manual_seed(0)
    x = torch.randn(b, 4, latent, latent, generator=g, device=args.device)
    width = denoiser.unet.config.cross_attention_dim
    context = torch.randn(b, 128, width, generator=g, device=args.device) * 0.5
    mask = torch.zeros(b, 128, dtype=torch.long, device=args.device)
    mask[:, :24] = 1
    context = (context * mask.unsqueeze(-1)).to(denoiser.dtype)
    lengths = torch.full((b,), 25.0, device=args.device)

    def step(t: int = 999):
        with torch.no_grad():
            return denoiser(x, t, context, mask, lengths)

    return step


def decode_call(movq, args):
    import torch

    latent = args.size // 8
    g = torch.Generator(args.device).manual_seed(1)
    z = torch.randn(args.decode_batch, 4, latent, latent, generator=g, device=args.device)
    z = z.to(next(movq.parameters()).dtype)

    def decode():
        with torch.no_grad():
            return movq.decode(z, force_not_quantize=True).sample

    return decode


# ------------------------------------------------------------------ profile
def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def profile_groups(fn, args, calls: int = 2) -> dict:
    """Device (CPU in smoke) time per operator group for one call of `fn`, from torch.profiler's
    operator self times (aten ops only, so kernels are not counted twice)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    synchronize(args.device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(args.device)
    groups: dict[str, float] = {}
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us <= 0:
            continue
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + us / 1000 / calls
        ops[e.key] = ops.get(e.key, 0.0) + us / 1000 / calls
    total = sum(groups.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {
        "ms_per_call": total,
        "groups_ms": {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "groups_share": {k: round(v / total, 4) for k, v in groups.items()} if total else {},
        "top_ops_ms": {k: round(v, 3) for k, v in top},
        "clock": "device" if cuda else "cpu",
    }


def run_profile(args) -> None:
    denoiser, movq = build(args)
    emit({"model": "unet", **profile_groups(unet_call(denoiser, args), args)}, args)
    emit({"model": "movq_decode", **profile_groups(decode_call(movq, args), args, 1)}, args)


# ------------------------------------------------------------------ compile
def compile_settings(variant: dict, args) -> dict:
    return {
        "unet": True,
        "backend": args.backend,
        "mode": variant.get("mode", "default"),
        "conv_1x1_as_mm": variant.get("conv_1x1_as_mm", False),
        "coordinate_descent_tuning": variant.get("coordinate_descent_tuning", False),
    }


def apply_variant(denoiser, variant: dict, args):
    """Settings of `variant` on the UNet, then its blocks compiled; returns what undoes it."""
    import torch

    from k3batch.model import compiling, fp8, performance

    unet = denoiser.unet
    if variant.get("channels_last"):
        performance.to_channels_last(unet)
        denoiser.memory_format = torch.channels_last
    performance.set_cudnn_benchmark(variant.get("cudnn_benchmark", False))
    if variant.get("fp8"):
        fp8.convert(unet)
    compiled = compiling.compile_model(
        "kandinsky3 UNet", unet, "kandinsky3_unet", compile_settings(variant, args)
    )

    def undo():
        compiled.restore()
        if variant.get("channels_last"):
            torch.nn.Module.to(unet, memory_format=torch.contiguous_format)
            denoiser.memory_format = torch.preserve_format
        performance.set_cudnn_benchmark(False)

    return compiled, undo


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_compiled(name: str, denoiser, step, reference, eager_ms, variant, args) -> None:
    """One compile variant: compile seconds, ms per step, recompiles, error against eager.
    A variant that fails (CUDA graphs, say) is recorded as such and the next one runs."""
    try:
        _measure_compiled(name, denoiser, step, reference, eager_ms, variant, args)
    except Exception as e:  # noqa: BLE001 - a benchmark records the failure and goes on
        emit({"variant": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}, args)


def _measure_compiled(name: str, denoiser, step, reference, eager_ms, variant, args) -> None:
    compiled, undo = apply_variant(denoiser, variant, args)
    try:
        seconds = first_call_s(step, args)  # Dynamo traces, Inductor compiles (or loads)
        graphs = dynamo_graphs()
        ms = median_ms(step, args)
        out = step(500)  # another timestep: the same graphs, no recompile
        recompiled = dynamo_graphs() - graphs
        counts = compiled.counts()
        emit(
            {
                "variant": name,
                "cache": args.cache or "?",
                "compile_s": round(seconds, 2),
                "eager_ms": eager_ms,
                "compiled_ms": round(ms, 3),
                "speedup": round(eager_ms / ms, 3) if eager_ms else None,
                "recompiles_at_another_timestep": recompiled,
                "rel_error_vs_eager_t500": rel_error(out, reference),
                "summary": compiled.summary(),
                "blocks": {k: v for k, v in counts.items() if k != "eager_blocks"},
            },
            args,
        )
    finally:
        undo()


def run_compile(args, variants=None) -> None:
    from k3batch.model import compiling

    denoiser, _ = build(args)
    step = unet_call(denoiser, args)
    step()
    eager_ms = round(median_ms(step, args), 3)
    reference = step(500)
    emit({"variant": "eager", "eager_ms": eager_ms}, args)
    for name in variants or args.variants:
        measure_compiled(name, denoiser, step, reference, eager_ms, VARIANTS[name], args)
    if args.save_artifacts:
        emit({"artifacts_bytes": compiling.save_artifacts(args.save_artifacts)}, args)


# ------------------------------------------------------------------ FP8
def run_fp8(args) -> None:
    from k3batch.model import fp8

    denoiser, _ = build(args)
    step = unet_call(denoiser, args)
    step()
    bf16_ms = round(median_ms(step, args), 3)
    at_999, at_500 = step(999), step(500)
    emit({"variant": "eager", "dtype": args.dtype, "eager_ms": bf16_ms}, args)
    # The compiled bfloat16 UNet first (its kernels are in the cache after the compile step).
    measure_compiled("regional", denoiser, step, at_500, bf16_ms, VARIANTS["regional"], args)
    try:
        n = fp8.convert(denoiser.unet)
        step()
        fp8_ms = round(median_ms(step, args), 3)
    except Exception as e:  # noqa: BLE001 - recorded; the compiled run would fail alike
        emit({"variant": "fp8_eager", "error": f"{type(e).__name__}: {str(e)[:500]}"}, args)
        return
    emit(
        {
            "variant": "fp8_eager",
            "fp8_gemms": n,
            "eager_ms": fp8_ms,
            "vs_bf16_eager": round(bf16_ms / fp8_ms, 3),
            "eps_rel_error_vs_bf16_t999": rel_error(step(999), at_999),
        },
        args,
    )
    # rel_error_vs_eager here: the compiled FP8 UNet against the bfloat16 one.
    measure_compiled("fp8_compiled", denoiser, step, at_500, bf16_ms, {}, args)


# ------------------------------------------------------------------ batch
def run_batch(args) -> None:
    """Eager UNet time per row and step at growing batches (guided: twice the rows per
    forward), until memory runs out: where a larger `resources.batch_size` stops paying."""
    import torch

    denoiser, _ = build(args)
    for rows in args.batches:
        args.batch = rows
        try:
            step = unet_call(denoiser, args)
            step()
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            ms = median_ms(step, args, max(2, args.iters // 2))
        except torch.OutOfMemoryError as e:
            emit({"rows": rows, "error": f"out of memory: {str(e)[:200]}"}, args)
            break
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        emit(
            {
                "rows": rows,
                "unet_batch": 2 * rows,
                "ms_per_step": round(ms, 3),
                "ms_per_row_step": round(ms / rows, 3),
                "peak_gib": peak,
            },
            args,
        )


# ------------------------------------------------------------------ decode
def run_decode(args) -> None:
    from k3batch.model import compiling, movq_attention, performance

    _, movq = build(args)
    decode = decode_call(movq, args)
    reference = None
    results = {}
    for compiled in (False, True):
        for kind in movq_attention.KINDS:
            performance.set_attention(movq, "sdpa")
            movq_attention.set_movq_attention(movq, kind)
            region = None
            if compiled:
                settings = {"movq": True, "backend": args.backend}
                region = compiling.compile_model(
                    "MoVQ decoder", movq.decoder, "movq_decoder", settings
                )
            try:
                seconds = first_call_s(decode, args)
                ms = median_ms(decode, args, max(2, args.iters // 3))
                out = decode()
            finally:
                if region is not None:
                    region.restore()
            if reference is None:
                reference = out
            name = f"{kind}{' compiled' if compiled else ''}"
            results[name] = ms
            emit(
                {
                    "attention": kind,
                    "compiled": compiled,
                    "first_call_s": round(seconds, 2),
                    "ms_per_decode": round(ms, 3),
                    "latents": args.decode_batch,
                    "max_abs_diff_vs_sdpa": float((out.float() - reference.float()).abs().max()),
                    **({"summary": region.summary()} if region is not None else {}),
                },
                args,
            )
    best = min(results, key=results.get)
    emit({"fastest": best, "vs_sdpa_eager": round(results["sdpa"] / results[best], 3)}, args)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from k3batch.model import compiling

    if args.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.load_artifacts:
        # Before any compile: Inductor then finds every kernel it would generate.
        emit({"artifacts_loaded": compiling.load_artifacts(args.load_artifacts)}, args)
    steps = {
        "profile": run_profile,
        "compile": run_compile,
        "fp8": run_fp8,
        "decode": run_decode,
        "batch": run_batch,
    }
    steps[args.step](args)


if __name__ == "__main__":
    main()
