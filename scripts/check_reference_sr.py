"""Run ai-forever/KandiSuperRes's own x4 / x2 pipeline against k3batch on the tiny checkpoint.

Not part of the test suite: it needs a checkout of ai-forever/KandiSuperRes and einops (which
the project does not depend on). It imports the reference's modules from the checkout
(nothing is copied), and

1. builds the reference's `UNet_sr` with `get_sr_model`'s arguments on the meta device and
   compares every parameter name and shape with `sr_unet.SRUNet(**SR_UNET)`;
2. writes the tiny x4 and x2 checkpoints with `make_tiny_sr`, loads each into the
   reference's own `UNet_sr` (strict), runs its `KandiSuperResPipeline` (flash=False: the
   DPM-Solver + MultiDiffusion path) on CPU in float32 with a seed, and runs k3batch's
   `KandiSuperRes.upscale` on the same file, image and seed.

The reference hard-codes its windows (1024 px every 800) as `get_views`' defaults; small
cases set those defaults to k3batch's tiny-test windows, so several windows overlap on a
small canvas; one case keeps the real windows. Both sides' float canvases (before the
conversion to pixels) are recorded on the way past and compared as well as the images.

    python scripts/check_reference_sr.py /path/to/KandiSuperRes

The reference package's `__init__` downloads weights (huggingface_hub), so its modules are
imported under an empty package object; torchvision, used only for ToTensor / ToPILImage /
Compose / Lambda, gets scripts/check_reference.py's stand-ins plus Compose and Lambda when it
is not installed.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import types

import diffusers  # noqa: F401 - before the stand-ins: it probes for torchvision on import
import numpy as np
import torch
from PIL import Image

from k3batch.model.superres import pipeline as superres
from k3batch.model.superres.pipeline import KandiSuperRes
from k3batch.model.superres.sr_unet import SR_UNET, TINY_SR_UNET, SRUNet
from k3batch.testing.tiny_sr import make_tiny_sr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_reference import _diff, _stand_ins  # noqa: E402

# (scale, low-resolution height, width, window, stride)
CASES = [
    (4, 14, 18, 32, 24),  # 56x72 canvas: 2x3 overlapping windows
    (4, 8, 8, 32, 24),  # one window
    (2, 21, 27, 32, 24),  # odd sides: even canvas 44x56, resized to 42x54 at the end
    (4, 280, 262, 1024, 800),  # the real windows: 1120x1048 canvas, 2x2 windows
]
SEED = 13
STEPS = 5


def _reference(checkout: str) -> dict:
    _stand_ins()
    tvt = sys.modules.get("torchvision.transforms")
    if tvt is not None and not hasattr(tvt, "Compose"):

        def compose(steps):
            def run(x):
                for step in steps:
                    x = step(x)
                return x

            return run

        tvt.Compose, tvt.Lambda = compose, lambda f: f
    pkg = types.ModuleType("KandiSuperRes")
    pkg.__path__ = [os.path.join(checkout, "KandiSuperRes")]
    sys.modules["KandiSuperRes"] = pkg
    names = ["model.unet_sr", "model.diffusion_sr", "sr_pipeline"]
    return {n: importlib.import_module(f"KandiSuperRes.{n}") for n in names}


def _reference_unet(ref: dict, config: dict):
    return ref["model.unet_sr"].UNet(
        init_channels=config["init_channels"],
        model_channels=config["model_channels"],
        num_channels=config["image_channels"],
        time_embed_dim=config["time_embed_dim"],
        groups=config["groups"],
        dim_mult=config["dim_mult"],
        num_resnet_blocks=config["num_resnet_blocks"],
        add_cross_attention=(False,) * len(config["dim_mult"]),
        add_self_attention=(False,) * len(config["dim_mult"]),
        feature_pooling_type="attention",
        lowres_cond=True,
    )


def check_names(ref: dict) -> None:
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in _reference_unet(ref, SR_UNET).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in SRUNet(**SR_UNET).state_dict().items()}
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    count = sum(int(np.prod(s)) for s in theirs.values())
    print(
        f"published architecture: {len(theirs)} tensors, {count} parameters; "
        f"names and shapes {'equal' if not differ else f'DIFFER: {differ[:5]}'}"
    )


def main(checkout: str) -> None:
    ref = _reference(checkout)
    check_names(ref)
    solver_cls = ref["model.diffusion_sr"].DPMSolver
    pipeline_cls = ref["sr_pipeline"].KandiSuperResPipeline
    default_views = solver_cls.get_views.__defaults__

    # Record both sides' float canvases, passing the values through unchanged.
    canvases = {}
    generate = solver_cls.generate_panorama

    def recorded_generate(self, *args, **kwargs):
        canvases["reference"] = out = generate(self, *args, **kwargs)
        return out

    to_uint8 = superres._to_uint8

    def recorded_to_uint8(x, size):
        canvases["k3batch"] = x
        return to_uint8(x, size)

    solver_cls.generate_panorama = recorded_generate
    superres._to_uint8 = recorded_to_uint8

    root = tempfile.mkdtemp(prefix="k3-sr-ref-check-")
    files = {s: make_tiny_sr(os.path.join(root, n), s) for s, n in superres.CHECKPOINTS.items()}
    worst = 0.0
    for scale, h, w, window, stride in CASES:
        unet = _reference_unet(ref, TINY_SR_UNET).eval()
        unet.load_state_dict(torch.load(files[scale], weights_only=True), strict=True)
        pipe = pipeline_cls(scale, "cpu", torch.float32, False, unet)
        picture = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8)
        solver_cls.get_views.__defaults__ = (window, stride)
        try:
            theirs = pipe(Image.fromarray(picture), steps=STEPS, seed=SEED)
        finally:
            solver_cls.get_views.__defaults__ = default_views
        # 15 windows per UNet call: the reference's view_batch_size, so both sides run the
        # same batch shapes (other shapes may round differently in CPU kernels, ~1e-6).
        model = KandiSuperRes.from_pretrained(
            files[scale],
            scale,
            "cpu",
            config=TINY_SR_UNET,
            window=window,
            stride=stride,
            max_tiles_per_call=15,
        )
        (ours,) = model.upscale([picture], [SEED], num_inference_steps=STEPS)
        d = (canvases["reference"] - canvases["k3batch"]).abs().max().item()
        worst = max(worst, d)
        print(
            f"x{scale} {h}x{w} -> {ours.shape[0]}x{ours.shape[1]}, windows {window}/{stride}: "
            f"canvas max |diff| {d:.3g}; image {_diff(theirs, ours)}"
        )
    print(f"worst canvas max |diff|: {worst:.3g}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
