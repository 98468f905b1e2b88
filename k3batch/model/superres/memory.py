"""GPU memory of an upscaling actor or upscaler replica (KandiSuperRes; the shared method:
`k3batch.model.memory`).

Counted, not measured on a GPU (`scripts/sr_flash_memory.py`: the full-size architectures on
meta under a live-tensor counter, checked against real CPU forwards): the SR UNet's
activations are 1.19 GiB per megapixel of UNet input in float16 (it has no attention and no
guidance batch), for `max_tiles_per_call` windows per call (x4, x2; Flash x2 above
`flash_whole_canvas_side`) or the whole canvas (Flash x2 below it); its float32 canvases (x,
noise, the upsampled input) for every image of a batch; Flash x2 adds the Flash UNet and MoVQ
weights (Kandinsky 3's counts), a 1024 px MoVQ tile (encode 5, decode 10 GiB in float32) and
the refine's tiles (1.0 GiB per 352-latent tile in float16).
"""

from __future__ import annotations

import functools

from k3batch.model.kandinsky3.memory import component_gib
from k3batch.model.memory import (
    BYTES,
    GIB,
    MEGAPIXEL,
    MemoryEstimate,
    weights_gib,
    with_margin,
)

# KandiSuperRes (counted; see the module docstring).
SR_GIB_PER_MEGAPIXEL = 1.19  # SR UNet activations per megapixel of input, float16
SR_CANVASES = 3  # float32 canvases per image: x, its noise, the upsampled input
MOVQ_TILE_GIB = {"encode": 5.0, "decode": 10.0}  # one 1024 px tile, float32
REFINE_GIB_PER_TILE = 1.0  # the Flash refine's UNet per 352-latent tile, float16


@functools.cache
def sr_unet_parameters() -> int:
    """Parameters of KandiSuperRes's SR UNet (built on the meta device)."""
    import torch

    from k3batch.model.superres.sr_unet import SR_UNET, SRUNet

    with torch.device("meta"):
        return sum(p.numel() for p in SRUNet(**SR_UNET).parameters())


def upscale_estimate(upscale, actor: str = "upscaling actor") -> MemoryEstimate:
    """GPU memory of an upscaling actor (or Serve replica) running `upscale` (an
    UpscaleConfig) on images up to `upscale.max_output_side`."""
    dt = upscale.dtype or "float16"  # null: float16 on a GPU
    side = upscale.max_output_side
    canvas = side * side
    windows = min(upscale.max_tiles_per_call * upscale.window**2, canvas)
    flash = upscale.model == "flash-x2"
    whole = flash and side <= upscale.flash_whole_canvas_side
    parts = [(f"SR UNet weights ({dt})", weights_gib(sr_unet_parameters(), dt))]
    images = upscale.batch_size
    parts.append(
        (
            f"float32 canvases of {images} images at {side}x{side}",
            images * SR_CANVASES * 3 * 4 * canvas / GIB,
        )
    )
    pixels = canvas if whole else windows
    what = "the whole canvas" if whole else f"{upscale.max_tiles_per_call} windows"
    sr = SR_GIB_PER_MEGAPIXEL * pixels / MEGAPIXEL * BYTES[dt] / 2
    peaks = [(f"SR UNet on {what}, {side}x{side}", sr)]
    if flash:
        parts.append((f"Flash UNet weights ({dt})", component_gib("unet", dt)))
        parts.append(("MoVQ weights (float32)", component_gib("movq", "float32")))
        peaks.append(("MoVQ decode of a 1024 px tile", MOVQ_TILE_GIB["decode"]))
        tiles = upscale.max_tiles_per_call
        refine = REFINE_GIB_PER_TILE * tiles * BYTES[dt] / 2
        peaks.append((f"Flash refine of {tiles} tiles", refine))
    name, gib = max(peaks, key=lambda p: p[1])
    parts.append((f"activations ({name})", gib))
    return with_margin(actor, parts)
