"""GPU memory of the Kandinsky 3 actors (the shared method: `k3batch.model.memory`).

Weights: T5 unless the text encoder pool has it or the device map puts it on the CPU, one
UNet per member the job loads (Flash too when `model.refine`), and MoVQ. The T5 activations
are a formula (tokens x widths), not measured: they are small beside the rest.

Conditioning (base): the ControlNet (`model.controlnet`: a copy of the UNet's first three
encoder levels, ~0.5B parameters) and the IP-Adapter (`model.ip_adapter`: its projections,
~0.4B, plus the CLIP ViT-L/14 image encoder, ~0.3B) are counted on meta like the UNet. Not
measured: with the ControlNet the UNet phase is taken as twice the UNet's own activations, an
upper bound (the ControlNet runs a part of the UNet's encoder before it and hands on
residuals the size of the skips the UNet holds anyway); the image tokens (4 per row) add
nothing worth counting.
"""

from __future__ import annotations

import functools

from k3batch.model.kandinsky3.members import BASE, INPAINT, MEMBERS, members_needed
from k3batch.model.memory import (
    BYTES,
    GIB,
    MemoryEstimate,
    decode_activations_gib,
    on_gpu,
    unet_activations_gib,
    weights_gib,
    with_margin,
)

TEXT_TOKENS = 128  # the encoder runs on 128 positions whatever the prompt


@functools.cache
def parameter_counts() -> dict[str, int]:
    """Parameters of the real components: text_encoder, movq, unet (4-in), unet9 (inpaint),
    controlnet, ip_adapter (its own weights) and image_encoder (CLIP ViT-L/14 vision)."""
    import torch
    from diffusers import VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, T5EncoderModel

    from k3batch.model.adapters import controlnet, ip_adapter
    from k3batch.model.kandinsky3.loading import full_architecture, unet_class

    unet_config, movq_config, t5_config = full_architecture()

    def base_unet():
        return unet_class(MEMBERS[BASE])(in_channels=4, **unet_config)

    # openai/clip-vit-large-patch14's vision tower and projection.
    clip = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=ip_adapter.IMAGE_EMBED_DIM,
    )
    builders = {
        "text_encoder": lambda: T5EncoderModel(t5_config),
        "movq": lambda: VQModel(**movq_config),
        "unet": base_unet,
        "unet9": lambda: unet_class(MEMBERS[INPAINT])(**unet_config),
        "controlnet": lambda: controlnet.Kandinsky3ControlNet(**controlnet.REAL_CONFIG),
        "ip_adapter": lambda: ip_adapter.IPAdapter(base_unet()),
        "image_encoder": lambda: CLIPVisionModelWithProjection(clip),
    }
    counts = {}
    for name, build in builders.items():
        # Meta tensors have shapes and no storage: the 8.7B T5 costs nothing to build.
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build().parameters())
    return counts


def component_gib(component: str, dtype: str) -> float:
    return weights_gib(parameter_counts()[component], dtype)


def _text_activations_gib(prompts: int, dtype: str) -> float:
    from k3batch.model.kandinsky3.loading import FULL_T5

    t5 = FULL_T5
    # Per token and layer: residual, q/k/v/o and norm outputs (~6 x d_model), the gated
    # feed-forward's two inputs and product (3 x d_ff), one row of attention scores per head.
    per_token = 6 * t5["d_model"] + 3 * t5["d_ff"] + t5["num_heads"] * TEXT_TOKENS
    return prompts * TEXT_TOKENS * per_token * BYTES[dtype] / GIB


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
    """GPU memory of a generation actor (or Serve replica) running `model` (a ModelConfig).

    `batch_size` rows per UNet call at `width` x `height` (use the largest size a row may ask
    for); `text_encoder_pool`: T5 runs in its own pool, not here.
    """
    dtypes, devices = model.dtype.model_dump(), model.device_map()
    parts: list[tuple[str, float]] = []
    pixels = width * height
    peaks: list[tuple[str, float]] = []
    guided = MEMBERS[model.name].guided
    if not text_encoder_pool and on_gpu(devices["text_encoder"]):
        dt = dtypes["text_encoder"]
        parts.append((f"T5 encoder weights ({dt})", component_gib("text_encoder", dt)))
        prompts = batch_size * (2 if guided else 1)
        peaks.append((f"T5 at {prompts} prompts", _text_activations_gib(prompts, dt)))
    if on_gpu(devices["unet"]):
        dt = dtypes["unet"]
        for m in members_needed(model.name, model.refine):
            count = "unet9" if m.in_channels != 4 else "unet"
            parts.append((f"UNet {m.name} weights ({dt})", component_gib(count, dt)))
        if model.controlnet:
            parts.append((f"ControlNet weights ({dt})", component_gib("controlnet", dt)))
        if model.ip_adapter is not None:
            parts.append((f"IP-Adapter weights ({dt})", component_gib("ip_adapter", dt)))
            parts.append((f"CLIP image encoder weights ({dt})", component_gib("image_encoder", dt)))
        samples = batch_size * (2 if guided else 1)
        unet = unet_activations_gib(samples, pixels, dt)
        what = f"UNet at batch {samples}, {width}x{height}"
        if model.controlnet:
            unet, what = 2 * unet, f"UNet + ControlNet at batch {samples}, {width}x{height}"
        peaks.append((what, unet))
    if on_gpu(devices["movq"]):
        dt = dtypes["movq"]
        parts.append((f"MoVQ weights ({dt})", component_gib("movq", dt)))
        images = min(decode_batch_size, batch_size)
        peaks.append(
            (
                f"MoVQ decode of {images} at {width}x{height}",
                decode_activations_gib(images, pixels, dt),
            )
        )
    if peaks:
        name, gib = max(peaks, key=lambda p: p[1])
        parts.append((f"activations ({name})", gib))
    return with_margin(actor, parts)


def text_encoder_estimate(
    model, *, batch_size: int, actor: str = "text encoder actor"
) -> MemoryEstimate:
    """GPU memory of a text encoder pool actor: T5 and `batch_size` rows (with negatives)."""
    dt = model.dtype.text_encoder
    guided = MEMBERS[model.name].guided
    prompts = batch_size * (2 if guided else 1)
    parts = [
        (f"T5 encoder weights ({dt})", component_gib("text_encoder", dt)),
        (f"activations (T5 at {prompts} prompts)", _text_activations_gib(prompts, dt)),
    ]
    return with_margin(actor, parts)
