"""KandiSuperRes x4 of a 1024x1024 image: k3batch's windows batched into UNet calls against
one window per call (how the reference's MultiDiffusion loop runs them), same GPU, same seed.

The full-size SR UNet (413M parameters, `k3batch.model.superres.sr_unet.SR_UNET`) is built on the
device with random weights (no download) in float16, the dtype KandiSuperRes runs in. A
1024x1024 image upscaled x4 is a 4096x4096 canvas: 5 x 5 windows of 1024 px every 800 px,
5 DPM-Solver steps, 125 window forwards. Two runs, each a whole `KandiSuperRes.upscale`
call (median over repeats): `max_tiles_per_call` = 4 (k3batch's default) and = 1. FLOPs per
window forward are counted with FlopCounterMode on a meta-device copy; MFU is FLOPs / time /
peak (989 TFLOP/s: H100 SXM dense bf16/fp16). The peak GPU memory of each run shows the
bound `max_tiles_per_call` keeps whatever the image size.

Run by `gpu_bench.py --members kandisuperres-x4`, or alone:

    python benchmarks/superres_bench.py              # CUDA, 1024x1024 x4 (~10 GB of GPU memory)
    python benchmarks/superres_bench.py --small      # CPU smoke run: tiny UNet, 64x64, 32 px windows
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

MEMBER = "kandisuperres-x4"
H100_TFLOPS = 989.0


def sizes(small: bool) -> dict:
    """Image side, window, stride and UNet architecture of a full or small run."""
    from k3batch.model.superres.sr_unet import SR_UNET, TINY_SR_UNET

    if small:
        return {"side": 16, "window": 32, "stride": 24, "unet": TINY_SR_UNET}
    return {"side": 1024, "window": 1024, "stride": 800, "unet": SR_UNET}


def window_flops(unet_config: dict, window: int) -> float:
    """FLOPs of one SR UNet forward on one window (FlopCounterMode, meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from k3batch.model.superres.sr_unet import SRUNet

    with torch.device("meta"):
        unet = SRUNet(**unet_config)
        x = torch.empty(1, 3, window, window)
        lowres = torch.empty(1, 3, window, window)
        t = torch.empty(1)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, lowres)
    return float(counter.get_total_flops())


def bench(
    small: bool,
    device: str,
    dtype: str,
    repeats: int,
    tiles: tuple[int, ...],
    compile: str | None = None,
) -> dict:
    """Eager runs at each `tiles`; with `compile` (a torch.compile backend) one more at
    `tiles[0]` with the SR UNet compiled block by block (`compiling`, regional)."""
    import numpy as np
    import torch

    from benchmarks.gpu_bench import peak_gib, reset_peak, timed
    from k3batch.model.loading import DTYPES
    from k3batch.model.superres.pipeline import STEPS, KandiSuperRes, window_starts
    from k3batch.model.superres.sr_unet import SRUNet

    s = sizes(small)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        unet = SRUNet(**s["unet"]).to(DTYPES[dtype]).eval()
    build_s = time.perf_counter() - started
    image = np.random.default_rng(0).integers(0, 256, (s["side"], s["side"], 3), np.uint8)
    canvas = s["side"] * 4
    windows = len(window_starts(canvas, s["window"], s["stride"])) ** 2
    flops = window_flops(s["unet"], min(canvas, s["window"])) * windows * STEPS
    runs, outputs = [], {}
    plan = [(t, False) for t in tiles] + ([(tiles[0], True)] if compile else [])
    for per_call, compiled in plan:
        model = KandiSuperRes(
            unet, 4, window=s["window"], stride=s["stride"], max_tiles_per_call=per_call
        )
        region = None
        if compiled:
            from k3batch.model import compiling

            region = compiling.compile_model("SR UNet", unet, "sr_unet", {"backend": compile})
        # Warm-up: kernels, cuDNN; compiled, the shapes of a whole image (windows per call).
        first = timed(lambda m=model: m.upscale([image], [0], num_inference_steps=1), device)[1]
        reset_peak(device)
        times = []
        for _ in range(repeats):
            out, seconds = timed(lambda m=model: m.upscale([image], [42]), device)
            times.append(seconds)
        outputs[(per_call, compiled)] = out[0]
        runs.append(
            {
                "max_tiles_per_call": per_call,
                "compiled": compiled,
                "seconds": statistics.median(times),
                "first_call_s": first,
                "unet_calls": -(-windows // per_call) * STEPS,
                "peak_gib": peak_gib(device),
                **({"summary": region.summary()} if region else {}),
            }
        )
        if region is not None:
            region.restore()
    first = outputs[(tiles[0], False)].astype(np.int16)
    return {
        "member": MEMBER,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": dtype,
        "image": f"{s['side']}x{s['side']} -> {canvas}x{canvas}",
        "windows": windows,
        "steps": STEPS,
        "build_seconds": build_s,
        "flops_per_image": flops,
        "runs": runs,
        # Batching windows must not change the image (exact on CPU; kernels may round apart).
        "max_abs_pixel_diff": max(
            int(np.abs(o.astype(np.int16) - first).max()) for o in outputs.values()
        ),
    }


def report(result: dict, peak_tflops: float | None) -> str:
    from benchmarks.gpu_bench import mfu

    lines = [
        f"{result['member']}: {result['image']} in {result['dtype']}, {result['windows']} windows "
        f"x {result['steps']} steps, {result['flops_per_image'] / 1e12:.2f} TFLOP/image",
        f"{'tiles/call':>10} {'s/image':>8} {'UNet calls':>10} {'MFU':>6} {'peak GiB':>8}",
    ]
    for r in result["runs"]:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"{r['max_tiles_per_call']:>10} {r['seconds']:>8.3f} {r['unet_calls']:>10} "
            f"{mfu(result['flops_per_image'], r['seconds'], peak_tflops):>6} {peak:>8}"
            + (f"  compiled (first call {r['first_call_s']:.1f} s)" if r.get("compiled") else "")
        )
    compiled = [r for r in result["runs"] if r.get("compiled")]
    by = {r["max_tiles_per_call"]: r["seconds"] for r in result["runs"] if not r.get("compiled")}
    if compiled and compiled[0]["max_tiles_per_call"] in by:
        eager = by[compiled[0]["max_tiles_per_call"]]
        lines.append(f"{MEMBER}: compiled / eager images/s = {eager / compiled[0]['seconds']:.2f}x")
    if len(by) > 1:
        # The most tiles per call against the reference's one: a ratio below 1 says batching
        # tiles did not pay here (not the fastest setting, which would hide that).
        most, one = max(by), by.get(1)
        if one:
            lines.append(
                f"{MEMBER}: {most} tiles/call vs 1 (the reference's loop) images/s = "
                f"{one / by[most]:.2f}x; max pixel difference {result['max_abs_pixel_diff']}"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny UNet on CPU, float32")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    p.add_argument("--dtype", default=None, help="default: float16 (float32 with --small)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs; default 2 (1 small)")
    p.add_argument("--tiles", default="4,1", help="max_tiles_per_call values to compare")
    p.add_argument("--compile", default=None, help="also a compiled run with this backend")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.small else "cuda")
    args.dtype = args.dtype or ("float32" if args.small else "float16")
    args.repeats = args.repeats or (1 if args.small else 2)
    args.tiles = tuple(int(t) for t in args.tiles.split(","))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = bench(args.small, args.device, args.dtype, args.repeats, args.tiles, args.compile)
    peak = H100_TFLOPS if args.device.startswith("cuda") else None
    print(report(result, peak), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
