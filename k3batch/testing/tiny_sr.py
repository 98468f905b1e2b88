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

    from k3batch.model.superres.pipeline import CHECKPOINTS
    from k3batch.model.superres.sr_unet import TINY_SR_UNET, SRUNet

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


def make_tiny_sr_folder(path: str, flash: bool = False) -> str:
    """The tiny set of `upscale.make_tiny` in the directory `path`: the x4 and x2 files under
    their published names, with `flash` also the Flash x2 file (its refine's context beside
    it and a tiny Kandinsky 3 checkpoint, reference layout, in `path`/kandinsky3: ~30 s, so
    only when asked), and `k3batch_config.json` with the SR UNets' architecture (which
    `model.superres.loading.load_upscaler` reads). Built once however many processes ask at
    the same time (`testing.build_once`); a set without the Flash files is rebuilt with
    them when `flash` asks."""
    import json

    from k3batch.model.superres.flash import CONTEXT_MASK_FILE
    from k3batch.model.superres.pipeline import CHECKPOINTS
    from k3batch.model.superres.sr_unet import TINY_SR_CONFIG_FILE, TINY_SR_UNET
    from k3batch.testing.build_once import build_dir
    from k3batch.testing.tiny import is_tiny_checkpoint, make_tiny

    def is_built(folder: str) -> bool:
        if not os.path.exists(os.path.join(folder, TINY_SR_CONFIG_FILE)):
            return False
        return not flash or (
            os.path.exists(os.path.join(folder, CONTEXT_MASK_FILE))
            and is_tiny_checkpoint(os.path.join(folder, "kandinsky3"), "reference")
        )

    def write(tmp: str) -> None:
        for scale, name in CHECKPOINTS.items():
            make_tiny_sr(os.path.join(tmp, name), scale)
        if flash:
            make_tiny_sr_flash(tmp)
            make_tiny(os.path.join(tmp, "kandinsky3"), layout="reference")
        with open(os.path.join(tmp, TINY_SR_CONFIG_FILE), "w") as f:  # last: complete
            json.dump({"sr_unet": TINY_SR_UNET}, f, indent=2)

    return build_dir(path, write, is_built)


def make_tiny_sr_flash(folder: str) -> str:
    """A tiny Flash x2 set in `folder`: `KandiSuperRes_flash_x2.pt` as the reference's loader
    reads it (`{"unet": state}`) and the fixed refine context `context.pt` / `context_mask.pt`
    (the KandiSuperRes repo's `weights/` files: [1, 128, C] in the Flash UNet's context space,
    one unmasked position) at the tiny Kandinsky 3 UNet's context width. Pair it with the
    tiny Kandinsky 3 checkpoint of `k3batch.testing.tiny.make_tiny` for the Flash UNet and
    the MoVQ. Returns `folder`."""
    import torch

    from k3batch.model.superres.flash import CONTEXT_FILE, CONTEXT_MASK_FILE, SR_FILE
    from k3batch.model.superres.sr_unet import TINY_SR_UNET, SRUNet
    from k3batch.testing.tiny_parts import TINY_UNET

    os.makedirs(folder, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SR_SEED + 22)
        state = SRUNet(**TINY_SR_UNET).state_dict()
        context = torch.randn(1, 128, TINY_UNET["cross_attention_dim"]).half()
    mask = torch.zeros(1, 128, dtype=torch.long)
    mask[0, 0] = 1
    for name, obj in (
        (SR_FILE, {"unet": state}),
        (CONTEXT_FILE, context),
        (CONTEXT_MASK_FILE, mask),
    ):
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        torch.save(obj, tmp)
        os.replace(tmp, os.path.join(folder, name))
    return folder
