"""A tiny random Kandinsky 3 IP-Adapter in the fork's weight layout (safetensors), and a tiny
CLIP image encoder whose embeddings it takes, for tests and the demo.

Sized for a given UNet (the tiny base UNet: context dim 4); `to_out_ip` is random rather than
zero as an untrained adapter's is, so the image branch visibly changes the output.
"""

from __future__ import annotations

import os

from k3batch.model.kandinsky3 import layout

TINY_IMAGE_EMBED_DIM = 16
TINY_SEED = 4242
TINY_CLIP_IMAGE_SIZE = 32


def build_tiny_ip_adapter(unet, seed: int = TINY_SEED):
    import torch

    from k3batch.model.adapters import ip_adapter

    torch.manual_seed(seed)
    adapter = ip_adapter.IPAdapter(unet, image_embed_dim=TINY_IMAGE_EMBED_DIM)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return adapter


def make_tiny_ip_adapter(path: str, unet) -> str:
    """Write `<path>/ip_adapter.safetensors` for `unet`; returns the file's path."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)

    out = os.path.join(path, layout.IP_ADAPTER_FILE)
    state = build_tiny_ip_adapter(unet).reference_state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    return out


def make_tiny_image_encoder(path: str) -> str:
    """A random `CLIPVisionModelWithProjection` (TINY_IMAGE_EMBED_DIM-d image embeddings) and
    its `CLIPImageProcessor` (OpenAI CLIP's normalisation, 32 px) saved to `path`."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(TINY_SEED + 11)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            image_size=TINY_CLIP_IMAGE_SIZE,
            patch_size=8,
            projection_dim=TINY_IMAGE_EMBED_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
        )
    )
    model.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(path)
    return path


def make_tiny_ip_set(path: str, unet) -> str:
    """The tiny set's IP-Adapter folder: `ip_adapter.safetensors` for `unet` and the tiny
    image encoder in `image_encoder/` (what `model.ip_adapter: {}` loads with make_tiny)."""

    make_tiny_ip_adapter(path, unet)
    make_tiny_image_encoder(os.path.join(path, layout.IP_ADAPTER_ENCODER_FOLDER))
    return path
