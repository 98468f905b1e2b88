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

    python scripts/check_reference_sr.py /path/to/KandiSuperRes [--record tests/goldens]

The cases (`SR_CASES`) and k3batch's side are `k3batch.testing.reference_goldens`'.
`--record DIR` writes each case's golden files (the picture, the reference's canvas and
image; every 16th pixel of the real-windows case) for tests/test_goldens.py.

The reference package's `__init__` downloads weights (huggingface_hub), so its modules are
imported under an empty package object; torchvision, used only for ToTensor / ToPILImage /
Compose / Lambda, gets scripts/check_reference.py's stand-ins plus Compose and Lambda when it
is not installed.
"""

from __future__ import annotations

import argparse
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
from k3batch.model.superres.sr_unet import SR_UNET, TINY_SR_UNET, SRUNet
from k3batch.testing import reference_goldens as golden
from k3batch.testing.tiny_sr import make_tiny_sr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_reference import _diff, _stand_ins  # noqa: E402


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


def main(checkout: str, record: str | None = None) -> None:
    ref = _reference(checkout)
    check_names(ref)
    solver_cls = ref["model.diffusion_sr"].DPMSolver
    pipeline_cls = ref["sr_pipeline"].KandiSuperResPipeline
    default_views = solver_cls.get_views.__defaults__

    # Record the reference's float canvas, passing the values through unchanged (k3batch's
    # is recorded by `golden.sr_side`).
    canvases = {}
    generate = solver_cls.generate_panorama

    def recorded_generate(self, *args, **kwargs):
        canvases["reference"] = out = generate(self, *args, **kwargs)
        return out

    solver_cls.generate_panorama = recorded_generate

    root = tempfile.mkdtemp(prefix="k3-sr-ref-check-")
    files = {s: make_tiny_sr(os.path.join(root, n), s) for s, n in superres.CHECKPOINTS.items()}
    worst = 0.0
    for case in golden.SR_CASES:
        unet = _reference_unet(ref, TINY_SR_UNET).eval()
        unet.load_state_dict(torch.load(files[case.scale], weights_only=True), strict=True)
        pipe = pipeline_cls(case.scale, "cpu", torch.float32, False, unet)
        picture = golden.sr_picture(case)
        solver_cls.get_views.__defaults__ = (case.window, case.stride)
        try:
            image = pipe(Image.fromarray(picture), steps=golden.SR_STEPS, seed=golden.SR_SEED)
        finally:
            solver_cls.get_views.__defaults__ = default_views
        theirs = {"canvas": canvases["reference"].numpy(), "image": np.asarray(image)}
        ours = golden.sr_side(files[case.scale], case, picture)
        d = np.abs(theirs["canvas"] - ours["canvas"]).max()
        worst = max(worst, d)
        h, w = ours["image"].shape[:2]
        print(
            f"{case.name}: x{case.scale} {case.height}x{case.width} -> {h}x{w}, windows "
            f"{case.window}/{case.stride}: canvas max |diff| {d:.3g}; image "
            f"{_diff(theirs['image'], ours['image'])}"
        )
        if record:
            weights = golden.file_weights(root, [superres.CHECKPOINTS[case.scale]])
            meta = golden.metadata(
                "KandiSuperRes", checkout, "scripts/check_reference_sr.py", case, weights
            )
            meta["settings"].update(seed=golden.SR_SEED, steps=golden.SR_STEPS)
            arrays = golden.subsampled(theirs, case.subsample)
            if case.subsample == 1:  # a large picture is rebuilt from its seed
                arrays["picture"] = picture
            golden.save(record, case.name, arrays, meta)
    print(f"worst canvas max |diff|: {worst:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a checkout of ai-forever/KandiSuperRes")
    parser.add_argument("--record", metavar="DIR", help="write each case's golden files to DIR")
    args = parser.parse_args()
    main(args.checkout, args.record)
