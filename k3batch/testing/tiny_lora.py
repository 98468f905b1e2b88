"""Tiny random LoRAs for a UNet's attention projections, written in either key layout that
`k3batch.model.adapters.lora` reads (tests and the demo). Seeded: the same arguments give the same
tensors, so one LoRA can be written in both layouts and compared."""

from __future__ import annotations

import re

from k3batch.model.adapters.lora import FORK_LINEARS, LAYOUT_DIFFUSERS, LAYOUT_FORK
from k3batch.model.kandinsky3 import keymap

# Kandinsky3UNet's attention linears (to_out.0 is the output projection).
ATTENTION = re.compile(r".+\.attention\.(to_q|to_k|to_v|to_out\.0)")
_FORK_NAMES = {linear: name for name, linear in FORK_LINEARS.items()}


def lora_tensors(unet, rank: int = 2, seed: int = 0, std: float = 0.3) -> dict:
    """{module name: (down, up)} for every attention projection of `unet` (a meta-device
    UNet will do: only its shapes are read)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if ATTENTION.fullmatch(name):
            n_out, n_in = module.weight.shape
            down = torch.randn(rank, n_in, generator=g) * std
            up = torch.randn(n_out, rank, generator=g) * std
            out[name] = (down, up)
    return out


def lora_keys(module: str, layout: str) -> tuple[str, str]:
    """The (down, up) keys of a UNet module's LoRA in `layout`."""
    if layout == LAYOUT_DIFFUSERS:
        return f"unet.{module}.lora_A.weight", f"unet.{module}.lora_B.weight"
    if layout != LAYOUT_FORK:
        raise ValueError(f"unknown LoRA layout {layout!r}")
    # The fork names the reference modules: <attention>.processor.<linear>_lora.{down,up}.
    attention, linear, _ = keymap.unet_to_reference(f"{module}.weight").rsplit(".", 2)
    prefix = f"{attention}.processor.{_FORK_NAMES[linear]}_lora"
    return f"{prefix}.down.weight", f"{prefix}.up.weight"


def write_lora(
    path: str, tensors: dict, layout: str = LAYOUT_DIFFUSERS, alpha: float | None = None
) -> str:
    """Save `lora_tensors`' output as a safetensors file in `layout` (`alpha`: diffusers
    layout only, one `.alpha` per module)."""
    import torch
    from safetensors.torch import save_file

    if alpha is not None and layout != LAYOUT_DIFFUSERS:
        raise ValueError("the kandinsky3-diffusers layout has no alpha")
    state = {}
    for module, (down, up) in tensors.items():
        down_key, up_key = lora_keys(module, layout)
        state[down_key] = down.contiguous()
        state[up_key] = up.contiguous()
        if alpha is not None:
            state[f"unet.{module}.alpha"] = torch.tensor(float(alpha))
    save_file(state, path)
    return path


def make_tiny_lora(path: str, unet, layout: str = LAYOUT_DIFFUSERS, **kwargs) -> str:
    """A random LoRA for `unet` at `path` (`kwargs`: `lora_tensors`' rank, seed, std)."""
    return write_lora(path, lora_tensors(unet, **kwargs), layout)
