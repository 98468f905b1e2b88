"""GPU memory of a Kandinsky 2.2 actor (the shared method: `k3batch.model.memory`).

Parameter counts from the Hub repos' float16 weight files (bytes / 2, rounded; not built, to
keep the estimate free of downloads), `PARAMS`. Activations use the Kandinsky 3 formulas, an
upper bound: the 1.2B decoder UNet is smaller than the 3B one at the same latent size, and the
prior works on 77 tokens and one embedding.
"""

from __future__ import annotations

from k3batch.model.memory import (
    MemoryEstimate,
    decode_activations_gib,
    on_gpu,
    unet_activations_gib,
    weights_gib,
    with_margin,
)

# Kandinsky 2.2 parameter counts (see the module docstring): prior transformer, its CLIP
# ViT-bigG text and image towers, the decoder UNet (inpainting and ControlNet alike), MoVQ,
# and Intel/dpt-large for depth.
PARAMS = {
    "prior": 1_020_000_000,
    "text_encoder": 695_000_000,
    "image_encoder": 1_845_000_000,
    "unet": 1_225_000_000,
    "movq": 67_000_000,
    "depth_estimator": 343_000_000,
}


def generation_estimate(
    model,
    *,
    batch_size: int,
    width: int,
    height: int,
    decode_batch_size: int = 1,
    text_encoder_pool: bool = False,
    actor: str = "generation actor",
) -> MemoryEstimate:
    """A Kandinsky 2.2 actor: prior (with its CLIP towers), decoder UNet, MoVQ, and the
    depth estimator when the config names one; activations as Kandinsky 3's (an upper bound)."""
    dtypes, devices = model.dtype.model_dump(), model.device_map()
    components = ["prior", "text_encoder", "image_encoder", "unet", "movq"]
    if model.depth_estimator:
        components.append("depth_estimator")
    parts = [
        (f"{c} weights ({dtypes[c]})", weights_gib(PARAMS[c], dtypes[c]))
        for c in components
        if on_gpu(devices[c])
    ]
    pixels, peaks = width * height, []
    if on_gpu(devices["unet"]):
        samples = batch_size * 2  # guidance on at the default scale
        unet = unet_activations_gib(samples, pixels, dtypes["unet"])
        peaks.append((f"UNet at batch {samples}, {width}x{height}", unet))
    if on_gpu(devices["movq"]):
        images = min(decode_batch_size, batch_size)
        decode = decode_activations_gib(images, pixels, dtypes["movq"])
        peaks.append((f"MoVQ decode of {images} at {width}x{height}", decode))
    if peaks:
        name, gib = max(peaks, key=lambda p: p[1])
        parts.append((f"activations ({name})", gib))
    return with_margin(actor, parts)
