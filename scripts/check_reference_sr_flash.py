"""Run ai-forever/KandiSuperRes's own Flash x2 pipeline against k3batch on tiny weights.

Not part of the test suite (needs a checkout of ai-forever/KandiSuperRes and einops). It
imports the reference's modules from the checkout (nothing is copied) the way
scripts/check_reference_sr.py does, writes the tiny Flash x2 file with `make_tiny_sr_flash`,
loads it into the reference's own `UNet_sr` (strict, through the `{"unet": state}` container
as `get_sr_model` reads it) and runs `KandiSuperResPipeline(flash=True, scale=2)` with
`refine=False` on CPU in float32 after `torch.manual_seed(seed)`; k3batch runs
`KandiSuperResFlash` with `refine=False` on the same file, picture and seed.

Covered: the four x0 steps (979/729/479/229, linear betas, fresh q_sample noise, the noise
order), the rounding of sides down to 32 and the resize back. Not covered yet: the Kandinsky
3 Flash refine (the reference's `model/unet.py` T2I UNet would have to be built at the tiny
Kandinsky 3 widths and fed k3batch's tiny Flash weights in the reference's names).

    python scripts/check_reference_sr_flash.py /path/to/KandiSuperRes
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from k3batch.model.sr_unet import TINY_SR_UNET
from k3batch.model.superres_flash import SR_FILE, KandiSuperResFlash
from k3batch.testing.tiny import make_tiny
from k3batch.testing.tiny_sr import make_tiny_sr_flash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_reference import _diff  # noqa: E402
from check_reference_sr import _reference, _reference_unet  # noqa: E402

CASES = [(32, 32), (40, 70), (64, 96)]  # 40x70: sides rounded down to 32x64, resized back
SEED = 21


def main(checkout: str) -> None:
    ref = _reference(checkout)
    pipeline_cls = ref["sr_pipeline"].KandiSuperResPipeline
    root = tempfile.mkdtemp(prefix="k3-srflash-ref-check-")
    folder = make_tiny_sr_flash(os.path.join(root, "sr"))
    k3 = make_tiny(os.path.join(root, "k3"), layout="reference")
    unet = _reference_unet(ref, TINY_SR_UNET).eval()
    unet.load_state_dict(torch.load(os.path.join(folder, SR_FILE), weights_only=True)["unet"])
    devices = {"movq": "cpu", "refiner": "cpu", "sr_model": "cpu"}
    dtypes = {"movq": torch.float32, "refiner": torch.float32, "sr_model": torch.float32}
    pipe = pipeline_cls(2, devices, dtypes, True, unet)
    model = KandiSuperResFlash.from_pretrained(
        folder, k3, device="cpu", config=TINY_SR_UNET, refine=False
    )
    for h, w in CASES:
        picture = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8)
        torch.manual_seed(SEED)
        theirs = np.asarray(pipe(Image.fromarray(picture), seed=SEED, refine=False))
        (ours,) = model.upscale([picture], [SEED])
        print(
            f"flash x2 SR steps {h}x{w} -> {ours.shape[0]}x{ours.shape[1]}: {_diff(theirs, ours)}"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
