"""Loading helpers every model family shares: dtypes by name, devices, reference pickles read
tensors-only, and models built on the meta device from a state dict.

Weights go straight to their device: `from_pretrained(...).to(device)` would first build
each model in host RAM (the 8.7B T5 alone is 17-35 GB per actor, and 8 actors share a
node's RAM); memory-mapped pickles are read through the page cache, never copied whole.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def per_component(value, name: str):
    """`value` is one setting for all components or a mapping per component."""
    return value[name] if isinstance(value, dict) else value


def load_pickle(file: str) -> dict:
    """A reference checkpoint: tensors only (`weights_only=True`), memory-mapped when possible."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # Files written in torch's legacy (pre-zip) format cannot be memory-mapped.
        return torch.load(file, map_location="cpu", weights_only=True)


def build(cls, config: dict, state: dict, dtype, device) -> nn.Module:
    """`cls(**config)` on the meta device, holding `state` cast onto `device` and `dtype`.

    Tensor by tensor from the memory-mapped file to the device: no full host copy (in float32
    on the CPU the parameters stay views of the file's pages), and at most the final model's
    size on the device. The same values as loading in float32 and casting the model after.
    """
    with torch.device("meta"):
        model = cls(**config)
    state = {
        k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def cast(model: nn.Module, device, dtype) -> nn.Module:
    # nn.Module.to: diffusers' ModelMixin.to warns on any dtype cast; these models keep no
    # float32-only modules, so the plain cast is what from_pretrained(torch_dtype=) does.
    return nn.Module.to(model, device=device, dtype=dtype)
