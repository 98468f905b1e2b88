"""A tiny random Kandinsky 3 IP-Adapter in the fork's weight layout (safetensors), for tests.

Sized for a given UNet (the tiny base UNet: context dim 4); `to_out_ip` is random rather than
zero as an untrained adapter's is, so the image branch visibly changes the output.
"""

from __future__ import annotations

import os

TINY_IMAGE_EMBED_DIM = 16
TINY_SEED = 4242


def build_tiny_ip_adapter(unet, seed: int = TINY_SEED):
    import torch

    from k3batch.model import ip_adapter

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
    out = os.path.join(path, "ip_adapter.safetensors")
    state = build_tiny_ip_adapter(unet).reference_state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, out)
    return out
