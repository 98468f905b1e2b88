"""Tiny random-weight KandiSuperRes checkpoints in the published file format.

The published `KandiSuperRes.ckpt` / `KandiSuperRes_x2.ckpt` are `torch.save`d UNet state
dicts: a flat mapping of the UNet's parameter names (no prefix) to tensors, which the
reference loads with `unet.load_state_dict(torch.load(path))`. The tiny file is the same
container with the same key names, for the `TINY_SR_UNET` widths, so tests go through the
real loader. Weights are PyTorch's default initialisation under a fixed seed (one per scale,
so x2 and x4 differ like the real pair), the same on every machine.
"""

from __future__ import annotations

import os

TINY_SR_SEED = 20240329


def make_tiny_sr(path: str, scale: int = 4) -> str:
    """Write a tiny x`scale` checkpoint to the file `path` (atomic rename); returns `path`.

    Load it with `KandiSuperRes.from_pretrained(path, scale, config=TINY_SR_UNET)`.
    """
    import torch

    from k3batch.model.sr_unet import TINY_SR_UNET, SRUNet
    from k3batch.model.superres import CHECKPOINTS

    if scale not in CHECKPOINTS:
        raise ValueError(f"scale: {scale!r}, expected one of {sorted(CHECKPOINTS)}")
    # fork_rng: the seed must not leak into the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SR_SEED + scale)
        state = SRUNet(**TINY_SR_UNET).state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path
