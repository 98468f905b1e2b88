"""How far lower-precision Kandinsky 3 images drift from float32 ones, same rows and seeds.

The full-size architecture with random weights (`tiny.random_components("full")`, no
download) is built once in float32 and sampled with the reference's base sampler (50 steps,
guidance 3, 1024x1024) in each precision, casting the same weights down in place:

- `fp32`: every component float32, TF32 off (the yardstick);
- `fp32+tf32`: the same weights, matmuls and convolutions in TF32 (`model.performance.tf32`);
- `reference`: the reference's dtype_map (UNet and MoVQ float32, T5 float16), TF32 off
  (`model.precision: reference`);
- `bfloat16`: every component bfloat16 (`model.precision: bfloat16`, the GPU configs);
- `fp8`: bfloat16 with the UNet's 1x1 convolutions and attention projections as row-wise
  scaled FP8 GEMMs (`model.precision: fp8`; converts the UNet in place, so it comes last).

For each it prints the PSNR of every image against the first variant's (the yardstick:
float32 by default; `--variants bfloat16,fp8` measures FP8 against bfloat16) (uint8 pixels,
dB; inf when equal), the relative error of one UNet forward's epsilon at t=999 (how much a
single step drifts, before 50 steps of chaos on random weights compound it) and seconds per
image. Without a float32 variant the weights are built in bfloat16 (half the memory).

    python benchmarks/precision_drift.py --json drift.json   # CUDA, full size (~60 GB)
    python benchmarks/precision_drift.py --variants bfloat16,fp8   # FP8 vs bfloat16
    python benchmarks/precision_drift.py --small             # CPU smoke run: tiny, 64x64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.gpu_bench import PROMPTS, timed  # noqa: E402

# name -> (dtype per component, tf32); applied in this order, each casting down in place.
VARIANTS = {
    "fp32": ({"unet": "float32", "text_encoder": "float32", "movq": "float32"}, False),
    "fp32+tf32": ({"unet": "float32", "text_encoder": "float32", "movq": "float32"}, True),
    "reference": ({"unet": "float32", "text_encoder": "float16", "movq": "float32"}, False),
    "bfloat16": ({"unet": "bfloat16", "text_encoder": "bfloat16", "movq": "bfloat16"}, False),
    "fp8": ({"unet": "bfloat16", "text_encoder": "bfloat16", "movq": "bfloat16"}, False),
}
FP8 = "fp8"  # the UNet's GEMMs in FP8 on top of its dtypes (model.performance.fp8)


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny architecture on CPU")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    p.add_argument("--size", type=int, default=None, help="image side; default 1024 (64 small)")
    p.add_argument("--steps", type=int, default=None, help="default 50 (5 small)")
    p.add_argument("--images", type=int, default=2, help="rows (one seed each)")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != FP8))
    p.add_argument("--json", default=None)
    p.add_argument("--jsonl", default=None, help="append a JSON line per variant here")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.small else "cuda")
    args.size = args.size or (64 if args.small else 1024)
    args.steps = args.steps or (5 if args.small else 50)
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or args.variants[0] == FP8 or (FP8 in args.variants and args.variants[-1] != FP8):
        p.error(
            f"--variants: the yardstick first, fp8 (if any) last, of {list(VARIANTS)}; "
            f"got {args.variants}"
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from k3batch.model import family, fp8, performance
    from k3batch.model.kandinsky3 import text as textmod
    from k3batch.model.kandinsky3.denoiser import Denoiser
    from k3batch.model.kandinsky3.pipeline import Kandinsky3, Request
    from k3batch.model.loading import DTYPES
    from k3batch.rows.seeds import derive_seed
    from k3batch.testing.tiny_parts import random_components

    size = "tiny" if args.small else "full"
    float32 = any(VARIANTS[v][0]["unet"] == "float32" for v in args.variants)
    build_dtype = torch.float32 if float32 else torch.bfloat16
    parts = random_components(size, args.device, build_dtype, members=(family.BASE,))
    unet, null = parts["unets"][family.BASE]
    model = Kandinsky3(
        parts["tokenizer"],
        parts["text_encoder"],
        parts["movq"],
        {family.BASE: Denoiser(family.MEMBERS[family.BASE], unet, null)},
    ).optimize("sdpa", channels_last=args.device.startswith("cuda"))
    rows = [
        Request(
            PROMPTS[i % len(PROMPTS)],
            None,
            derive_seed(0, str(i)),
            args.size,
            args.size,
            args.steps,
            3.0,
        )
        for i in range(args.images)
    ]
    latent = args.size // 8
    probe_x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    tokens = textmod.tokenize(model.tokenizer, [rows[0].prompt], [None])

    @torch.no_grad()
    def probe_eps():
        """One UNet forward's epsilon at t=999 for row 0, through the variant's T5 too."""
        d = model.denoiser
        hidden = textmod.run_encoder(tokens, model.text_encoder, with_negatives=False)
        cond = textmod.project(hidden, tokens.lengths, d.projection, None, None, d.dtype)
        eps = d(probe_x, 999, cond.context, cond.context_mask, cond.pool_lengths)
        return eps.float().cpu()

    def sample_and_decode():
        latents = model.sample(rows)
        return latents, model.decode(latents)

    results, yardstick, saturated = {}, {}, None
    for name in args.variants:
        dtypes, tf32 = VARIANTS[name]
        performance.set_tf32(tf32)
        for component, module in (
            ("unet", unet),
            ("text_encoder", model.text_encoder),
            ("movq", model.movq),
        ):
            torch.nn.Module.to(module, DTYPES[dtypes[component]])
        model.denoiser.dtype = DTYPES[dtypes["unet"]]
        model.denoiser.null_embedding = null.to(DTYPES[dtypes["unet"]])
        if name == FP8:
            fp8.convert(unet)
        eps = probe_eps()
        (latents, images), seconds = timed(sample_and_decode, args.device)
        latents, seconds = latents.float().cpu(), seconds / len(rows)
        if name == args.variants[0]:
            yardstick = {"images": images, "eps": eps, "latents": latents}
            # PSNR says little about images that random weights drove to 0 or 255 everywhere.
            saturated = sum(float(((i == 0) | (i == 255)).mean()) for i in images) / len(images)
            print(f"{name} images: {100 * saturated:.0f}% of pixels at 0 or 255", flush=True)
        rel = float((eps - yardstick["eps"]).norm() / yardstick["eps"].norm())
        ref = yardstick["latents"]
        latent_rel = [float((a - b).norm() / b.norm()) for a, b in zip(latents, ref, strict=True)]
        results[name] = {
            "dtypes": dtypes,
            "tf32": tf32,
            "psnr_db": [psnr(a, b) for a, b in zip(images, yardstick["images"], strict=True)],
            "eps_rel_error": rel,
            "final_latent_rel_error": latent_rel,
            "seconds_per_image": seconds,
        }
        r = results[name]
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                record = {"bench": "precision_drift", "variant": name, "vs": args.variants[0]}
                f.write(json.dumps({**record, **r}) + "\n")
        print(
            f"{name:<10} PSNR vs {args.variants[0]}: {', '.join(f'{v:.1f}' for v in r['psnr_db'])} dB; "
            f"final latent rel. error {', '.join(f'{v:.2e}' for v in latent_rel)}; "
            f"one UNet step's eps rel. error {rel:.2e}; {seconds:.2f} s/image",
            flush=True,
        )
    performance.set_tf32(False)
    out = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "yardstick": args.variants[0],
        "saturated_fraction": saturated,
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
