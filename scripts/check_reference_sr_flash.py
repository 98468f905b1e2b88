"""Run ai-forever/KandiSuperRes's own Flash x2 pipeline against k3batch on tiny weights.

Not part of the test suite (needs a checkout of ai-forever/KandiSuperRes and einops). It
imports the reference's modules from the checkout (nothing is copied) the way
scripts/check_reference_sr.py does, writes the tiny Flash x2 file with `make_tiny_sr_flash`,
loads it into the reference's own `UNet_sr` (strict, through the `{"unet": state}` container
as `get_sr_model` reads it) and runs `KandiSuperResPipeline(flash=True, scale=2)` with
`refine=False` on CPU in float32 after `torch.manual_seed(seed)`; k3batch runs
`KandiSuperResFlash` with `refine=False` on the same file, picture and seed.

Covered: the four x0 steps (979/729/479/229, linear betas, fresh q_sample noise, the noise
order), the rounding of sides down to 32 and the resize back; the MoVQ tiling: the
reference's own `movq.MoVQ` (KandiSuperRes's, with `use_tiling`) built at the tiny widths
with the tiny Kandinsky 3's `weights/movq.pt`, its `encode` / `decode` against
`KandiSuperResFlash.encode` / `decode`, at the reference's 1024 px tile (a 1088x1152 image)
and at a 64 px tile (every tile path on a small image). Not covered yet: the Kandinsky 3
Flash refine (the reference's `model/unet.py` T2I UNet would have to be built at the tiny
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
    for tile, (h, w) in ((1024, (1088, 1152)), (64, (136, 200))):
        movq = _reference_movq(k3, tile)
        ours = KandiSuperResFlash(
            model.unet, model.refiner, model.movq, model.context, model.context_mask, movq_tile=tile
        )
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h)) * 2 - 1
        with torch.no_grad():
            z_ref, z_ours = movq.encode(x), ours.encode(x)
            x_ref, x_ours = movq.decode(z_ref), ours.decode(z_ref)
        print(
            f"MoVQ tile {tile}, {h}x{w}: encode max |diff| {(z_ref - z_ours).abs().max():.2e}, "
            f"decode max |diff| {(x_ref - x_ours).abs().max():.2e} (of values up to "
            f"{x_ref.abs().max():.1f}: the two MoVQ implementations' float32 rounding, which "
            "one untiled tile shows too)"
        )


def _reference_movq(k3: str, tile: int):
    """KandiSuperRes's own MoVQ (tiling as `get_movq`, tile `tile` px) at the tiny widths."""
    import importlib

    from k3batch.model import family
    from k3batch.testing.tiny_parts import TINY_MOVQ

    levels = len(TINY_MOVQ["block_out_channels"])
    ch = TINY_MOVQ["block_out_channels"][0]
    movq = importlib.import_module("KandiSuperRes.movq").MoVQ(
        dict(
            double_z=False,
            z_channels=4,
            resolution=256,
            in_channels=3,
            out_ch=3,
            ch=ch,
            ch_mult=[c // ch for c in TINY_MOVQ["block_out_channels"]],
            num_res_blocks=TINY_MOVQ["layers_per_block"],
            attn_resolutions=[256 // 2 ** (levels - 1)],
            dropout=0.0,
            tile_sample_min_size=tile,
            tile_overlap_factor_enc=0.0,
            tile_overlap_factor_dec=0.25,
            use_tiling=True,
        )
    )
    file = os.path.join(k3, family.REFERENCE_WEIGHTS_DIR, family.REFERENCE_MOVQ_FILE)
    movq.load_state_dict(torch.load(file, weights_only=True))
    return movq.eval()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
