"""Tiny random LoRAs for a UNet's attention projections, written in either key layout that
`k3batch.model.adapters.lora` reads (tests and the demo). Seeded: the same arguments give the same
tensors, so one LoRA can be written in both layouts and compared.

The fork's layout is written from the fork's own names, not from `lora.FORK_LINEARS` (the
table under test), so a wrong table there fails the tests. Read from ai-forever/
kandinsky3-diffusers at commit 0f2fb975ff1b19f28c74b8c4ae69d319e9dae882 (no code copied):
- `src/kandinsky3_diffusers/models/attention_processor.py`, `LoraKandi3AttnProcessor`: four
  `LoRALinearLayer`s, `to_query_lora`, `to_key_lora`, `to_v_lora`, `to_out_lora`; its
  `forward` adds them to the reference `Attention`'s `to_query(x)`, `to_key(context)`,
  `to_value(context)` and `output_layer(out)`;
- `src/kandinsky3_diffusers/models/lora.py`, `LoRALinearLayer`: `down` = Linear(in, rank),
  `up` = Linear(rank, out), no bias; `network_alpha` None leaves the product unscaled;
- `examples/kandinsky3/kandi3_train_lora.py`: one processor per attention module of
  `UNetKandi3` (the reference's module tree), keyed `<module>.attention.processor`
  (`feature_pooling.attention.processor`, `down_samples.1.resnet_attn_blocks.0.1.attention.
  processor`, ...), trained with `network_alpha` None; saved through `AttnProcsLayers`
  (`src/kandinsky3_diffusers/loaders.py`), whose state-dict hook turns `layers.<i>.` back
  into the processor's key: `<module>.attention.processor.to_query_lora.down.weight`.
"""

from __future__ import annotations

import re

from k3batch.model.adapters.lora import LAYOUT_DIFFUSERS, LAYOUT_FORK
from k3batch.model.kandinsky3 import keymap

# Kandinsky3UNet's attention linears (to_out.0 is the output projection).
ATTENTION = re.compile(r".+\.attention\.(to_q|to_k|to_v|to_out\.0)")
# The fork's LoRA layer added to each reference Attention linear (LoraKandi3AttnProcessor).
FORK_PROCESSOR_LAYERS = {
    "to_query": "to_query_lora",
    "to_key": "to_key_lora",
    "to_value": "to_v_lora",
    "output_layer": "to_out_lora",
}
# The processor keys of kandi3_train_lora.py, on UNetKandi3's module names.
FORK_PROCESSOR = re.compile(
    r"(feature_pooling|(down|up)_samples\.\d+\.(self_attention_block|resnet_attn_blocks\.\d+\.1))"
    r"\.attention\.processor"
)


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
    # The fork names the reference modules: <attention>.processor.<layer>.{down,up}.weight.
    attention, linear, _ = keymap.unet_to_reference(f"{module}.weight").rsplit(".", 2)
    return fork_keys(attention, linear)


def fork_keys(attention: str, linear: str) -> tuple[str, str]:
    """The fork's (down, up) keys of the LoRA on reference module `attention`'s `linear`
    (`to_query`, `to_key`, `to_value`, `output_layer`)."""
    processor = f"{attention}.processor"
    if not FORK_PROCESSOR.fullmatch(processor):
        raise ValueError(f"{attention!r} is no attention module of the fork's UNetKandi3")
    prefix = f"{processor}.{FORK_PROCESSOR_LAYERS[linear]}"
    return f"{prefix}.down.weight", f"{prefix}.up.weight"


def fork_lora_for_reference_state(
    state: dict, rank: int = 2, seed: int = 0, std: float = 0.3
) -> tuple[dict, dict]:
    """A random LoRA in the fork's layout for a reference-layout UNet state dict, named from
    the state dict's own module names (no mapping to diffusers' names): (the file's tensors,
    {reference weight key: (down, up)}), for every linear of every attention module."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tensors, updates = {}, {}
    for key in sorted(state):
        attention, _, linear = key.removesuffix(".weight").rpartition(".")
        if not key.endswith(".weight") or linear not in FORK_PROCESSOR_LAYERS:
            continue
        if not attention.endswith(".attention"):
            continue
        n_out, n_in = state[key].shape
        down = torch.randn(rank, n_in, generator=g) * std
        up = torch.randn(n_out, rank, generator=g) * std
        down_key, up_key = fork_keys(attention, linear)
        tensors[down_key], tensors[up_key] = down, up
        updates[key] = (down, up)
    return tensors, updates


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
