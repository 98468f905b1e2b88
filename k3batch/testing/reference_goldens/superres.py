"""The KandiSuperRes cases, x4/x2 and Flash x2 (scripts/check_reference_sr*.py), and k3batch's
side of each."""

from __future__ import annotations

import dataclasses

import numpy as np

from .files import file_tensors, rng_picture, to_numpy, weights_summary


# --------------------------------------------------------------------------- KandiSuperRes
# scripts/check_reference_sr.py: ai-forever/KandiSuperRes's DPM-Solver + MultiDiffusion x4 / x2
# on the tiny checkpoints (make_tiny_sr), windows set to k3batch's tiny-test ones or the real.
@dataclasses.dataclass(frozen=True)
class SRCase:
    name: str
    scale: int
    height: int
    width: int
    window: int
    stride: int
    subsample: int = 1  # the golden keeps every n-th pixel of a large output


SR_SEED = 13
SR_STEPS = 5
# The reference's view_batch_size: both sides run the same batch shapes (other shapes may
# round differently in CPU kernels, ~1e-6).
SR_TILES_PER_CALL = 15
SR_CASES = (
    SRCase("sr_x4_windows", 4, 14, 18, 32, 24),  # 56x72 canvas: 2x3 overlapping windows
    SRCase("sr_x4_one_window", 4, 8, 8, 32, 24),
    SRCase("sr_x2_odd_sides", 2, 21, 27, 32, 24),  # even canvas 44x56, resized to 42x54
    # The real windows: 1120x1048 canvas, 2x2 windows of 1024 every 800.
    SRCase("sr_x4_real_windows", 4, 280, 262, 1024, 800, subsample=16),
)


def sr_picture(case: SRCase) -> np.ndarray:
    return rng_picture(case.height, case.width, case.height * case.width)


def sr_side(path: str, case: SRCase, picture: np.ndarray) -> dict[str, np.ndarray]:
    """k3batch's `KandiSuperRes` on the case: the float canvas before the conversion to
    pixels (channels first) and the image, every `subsample`-th pixel."""
    from k3batch.model.superres.pipeline import KandiSuperRes
    from k3batch.model.superres.sr_unet import TINY_SR_UNET

    model = KandiSuperRes.from_pretrained(
        path,
        case.scale,
        "cpu",
        config=TINY_SR_UNET,
        window=case.window,
        stride=case.stride,
        max_tiles_per_call=SR_TILES_PER_CALL,
    )
    with canvas_recorded() as canvases:
        (image,) = model.upscale([picture], [SR_SEED], num_inference_steps=SR_STEPS)
    return {"canvas": canvases[0], "image": image}


class canvas_recorded:
    """Records the float canvases `superres.pipeline._to_uint8` turns into pixels (both SR
    models end there), passing them through unchanged."""

    def __enter__(self) -> list:
        from k3batch.model.superres import pipeline

        self.module, self.original, canvases = pipeline, pipeline._to_uint8, []

        def recorded(x, size):
            canvases.append(x.detach().cpu().numpy())
            return self.original(x, size)

        pipeline._to_uint8 = recorded
        return canvases

    def __exit__(self, *exc) -> None:
        self.module._to_uint8 = self.original


def subsampled(arrays: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """Every `step`-th pixel of images (HxWx3) and canvases (...xHxW)."""
    if step == 1:
        return arrays
    out = dict(arrays)
    out["image"] = arrays["image"][::step, ::step]
    out["canvas"] = arrays["canvas"][..., ::step, ::step]
    return out


# --------------------------------------------------------------------------- Flash x2
# scripts/check_reference_sr_flash.py: KandiSuperRes's Flash x2 (its four x0 steps, and with
# refine=True its tiled MoVQ and the Kandinsky 3 Flash refine) on make_tiny_sr_flash and the
# tiny Kandinsky 3 of make_tiny(layout="reference").
@dataclasses.dataclass(frozen=True)
class FlashCase:
    name: str
    height: int
    width: int
    refine: bool
    store_noise: bool = False  # the SR steps' draws are pixel-sized: the smallest case only
    subsample: int = 1  # the golden keeps every n-th pixel of a large image


FLASH_SEED = 21
FLASH_CASES = (
    FlashCase("sr_flash_32x32", 32, 32, False),
    FlashCase("sr_flash_40x70", 40, 70, False),  # sides rounded down to 32x64, resized back
    FlashCase("sr_flash_64x96", 64, 96, False),
    # Refine: one latent tile (32x32, 40x70); two of the real 352-every-264 tiles down
    # (1088x64: a 272x16 latent, tiles 272 and 8 latents tall, blended over 8) with the tiled
    # MoVQ (3 encode tiles, 3 decode tiles).
    FlashCase("sr_flash_refine_32x32", 32, 32, True, store_noise=True),
    FlashCase("sr_flash_refine_40x70", 40, 70, True),
    FlashCase("sr_flash_refine_1088x64", 1088, 64, True, subsample=4),
    FlashCase("sr_flash_refine_64x1088", 64, 1088, True, subsample=4),
)


def flash_picture(case: FlashCase) -> np.ndarray:
    return rng_picture(case.height, case.width, case.height * case.width)


def flash_files(case: FlashCase) -> dict[str, list[str]]:
    """{"sr": files of the make_tiny_sr_flash folder, "k3": of the reference-layout tiny set}
    the case reads."""
    from k3batch.model.kandinsky3 import layout, members
    from k3batch.model.superres.flash import CONTEXT_FILE, CONTEXT_MASK_FILE, SR_FILE

    if not case.refine:
        return {"sr": [SR_FILE], "k3": []}
    w = layout.REFERENCE_WEIGHTS_DIR
    flash = members.MEMBERS["kandinsky3-flash"].reference_file
    return {
        "sr": [SR_FILE, CONTEXT_FILE, CONTEXT_MASK_FILE],
        "k3": [f"{w}/{flash}", f"{w}/{layout.REFERENCE_MOVQ_FILE}"],
    }


def flash_weights(sr_folder: str, k3_root: str, case: FlashCase) -> dict:
    files = flash_files(case)
    sr, sr_extra = file_tensors(sr_folder, files["sr"])
    k3, k3_extra = file_tensors(k3_root, files["k3"])
    return weights_summary(sr + k3, sr_extra + k3_extra)


def flash_side(model, case: FlashCase, picture: np.ndarray, latent=None, eps=None) -> dict:
    """k3batch's `KandiSuperResFlash` on the case (`model`'s parts, `refine` the case's),
    recording on the way past (values unchanged): every noise draw, the MoVQ latent, each
    refine tile's UNet input x_t and epsilon, the refined latent; and the image.

    `latent`: start the refine from this MoVQ latent instead of k3batch's own encode.
    `eps(x, t, k3batch_eps)`: the epsilon the refine uses in place of the Flash UNet's."""
    from k3batch.model.superres.flash import KandiSuperResFlash

    m = KandiSuperResFlash(
        model.unet,
        model.refiner,
        model.movq,
        model.context,
        model.context_mask,
        refine=case.refine,
    )
    rec: dict = {"noise": [], "eps": []}
    noise, encode, refine_tiles, own_eps = m._noise, m.encode, m.refine_tiles, m._eps

    def rec_noise(row, shape):
        x = noise(row, shape)
        rec["noise"].append(x.clone())
        return x

    def rec_encode(x):
        rec["latent"] = z = encode(x) if latent is None else latent.clone()
        return z.clone()

    def rec_refine_tiles(rows, latents):
        rec["refined"] = out = refine_tiles(rows, latents)
        return [z.clone() for z in out]

    def rec_eps(x, t):
        e = own_eps(x, t) if eps is None else eps(x, t, own_eps)
        rec["eps"] += [(x[k : k + 1].clone(), e[k : k + 1].clone()) for k in range(len(x))]
        return e

    m._noise, m.encode, m.refine_tiles, m._eps = rec_noise, rec_encode, rec_refine_tiles, rec_eps
    (rec["image"],) = m.upscale([picture], [FLASH_SEED])
    return rec


def flash_arrays(rec: dict, case: FlashCase) -> dict[str, np.ndarray]:
    """What a Flash golden keeps of `flash_side`'s (or the reference's) record."""
    out = {"image": to_numpy(rec["image"])[:: case.subsample, :: case.subsample]}
    if case.refine:
        out["latent"] = to_numpy(rec["latent"])
        out["refined"] = to_numpy(
            rec["refined"][0] if isinstance(rec["refined"], list) else rec["refined"]
        )
        if case.store_noise:
            out.update({f"noise_{i}": to_numpy(x) for i, x in enumerate(rec["noise"])})
    return out
