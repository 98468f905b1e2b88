"""LoRA for the Kandinsky 3 UNet: read a safetensors file, map its keys onto the UNet's
weights, check every one, and fuse `W += scale * alpha / rank * up @ down` at load.

Two key layouts are read (`detect_layout`):
- `kandinsky3-diffusers`: the ai-forever/kandinsky3-diffusers fork's `LoraKandi3AttnProcessor`
  weights as its `kandi3_train_lora.py` saves them, on the reference module names:
  `<attention>.processor.{to_query,to_key,to_v,to_out}_lora.{down,up}.weight`, no alpha
  (the script trains with `network_alpha=None`, i.e. a scale of 1).
- `diffusers`: diffusers' and PEFT's names on `Kandinsky3UNet`'s modules, with an optional
  `unet.` or `base_model.model.` prefix: `<module>.lora_A/lora_B.weight` (PEFT),
  `<module>.lora.down/up.weight` (older diffusers), `<attention>.processor.to_q_lora...`
  (diffusers' attention processors), with `<module>.alpha` or the PEFT `lora_alpha` that
  diffusers writes into the file's metadata.

Fusing rather than applying per step: a job's LoRAs are fixed for the whole job, so folding
them into the weights once costs nothing per step, keeps torch.compile, channels_last and
the attention kernels unchanged, and needs no second code path in the sampler. The fuse is
written here (no `peft`): it is one matrix product per weight, and the fork's layout is not
PEFT's anyway. Sums are taken in float32 and cast back to the weight's dtype once.

torch and safetensors are imported inside the functions: `k3batch.resume` reads `sha256`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from k3batch.model.kandinsky3 import keymap

if TYPE_CHECKING:
    import torch
    from torch import nn

LAYOUT_FORK = "kandinsky3-diffusers"
LAYOUT_DIFFUSERS = "diffusers"

_PREFIXES = ("unet.", "base_model.model.")
# The fork's processor names its four LoRA layers after the reference Attention's linears.
_FORK = re.compile(r"(.+)\.processor\.(to_query|to_key|to_v|to_out)_lora\.(down|up)\.weight")
FORK_LINEARS = {
    "to_query": "to_query",
    "to_key": "to_key",
    "to_v": "to_value",
    "to_out": "output_layer",
}
_DIFFUSERS = [
    (re.compile(r"(.+)\.lora_(A|B)(?:\.default)?\.weight"), {"A": "down", "B": "up"}),
    (re.compile(r"(.+)\.lora\.(down|up)\.weight"), {"down": "down", "up": "up"}),
]
_DIFFUSERS_PROCESSOR = re.compile(
    r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"
)
_ALPHA = re.compile(r"(.+)\.alpha")


class LoraError(ValueError):
    """A LoRA file that does not fit the UNet: one line naming the file and the key."""


@dataclass
class Update:
    """One weight's low-rank update from one file."""

    target: str  # the UNet parameter, e.g. down_blocks.1.attentions.1.attention.to_q.weight
    key: str  # the file's key of `down`, for messages
    down: Any = None  # (rank, in[, kh, kw])
    up: Any = None  # (out, rank[, 1, 1])
    alpha: float | None = None  # None: alpha = rank (a factor of 1)

    def factor(self) -> float:
        rank = self.down.shape[0]
        return 1.0 if self.alpha is None else self.alpha / rank


def sha256(path: str) -> str:
    """The file's content hash: the job fingerprint records it (the same path may be rewritten)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def detect_layout(keys) -> str:
    """The fork's layout when a key is its processor's weight on a reference module. The name
    alone does not tell: diffusers' attention processors call two of their layers `to_v_lora`
    and `to_out_lora` too, so the module must be a reference name (one the key map renames)."""
    for k in keys:
        m = _FORK.fullmatch(_strip(k))
        if m and keymap.unet_to_diffusers(m.group(1)) != m.group(1):
            return LAYOUT_FORK
    return LAYOUT_DIFFUSERS


def _parse(key: str, layout: str) -> tuple[str, str] | None:
    """(UNet parameter, 'down' | 'up' | 'alpha') of a file key; None when it is no LoRA key."""
    k = _strip(key)
    if layout == LAYOUT_FORK:
        m = _FORK.fullmatch(k)
        if not m:
            return None
        module, proj, part = m.groups()
        return keymap.unet_to_diffusers(f"{module}.{FORK_LINEARS[proj]}.weight"), part
    m = _DIFFUSERS_PROCESSOR.fullmatch(k)
    if m:
        module, proj, part = m.groups()
        return f"{module}.{'to_out.0' if proj == 'to_out' else proj}.weight", part
    for pattern, parts in _DIFFUSERS:
        m = pattern.fullmatch(k)
        if m:
            return f"{m.group(1)}.weight", parts[m.group(2)]
    m = _ALPHA.fullmatch(k)
    if m:
        return f"{m.group(1)}.weight", "alpha"
    return None


def _peft_alpha(path: str, metadata: dict | None) -> float | None:
    """The `lora_alpha` diffusers writes into the file's metadata for a PEFT LoRA."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    config = {_strip(k): v for k, v in config.items()}
    for name in ("alpha_pattern", "use_dora", "use_rslora"):
        if config.get(name):
            raise LoraError(f"LoRA {path}: PEFT {name} is not supported (metadata {name})")
    alpha = config.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def read(path: str) -> tuple[str, list[Update]]:
    """(layout, the file's updates), every key accounted for; raises LoraError."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except FileNotFoundError:
        raise LoraError(f"LoRA {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own errors: not a safetensors file
        raise LoraError(f"LoRA {path}: not a safetensors file ({type(e).__name__}: {e})") from None
    if not tensors:
        raise LoraError(f"LoRA {path}: holds no tensors")
    layout = detect_layout(tensors)
    default_alpha = _peft_alpha(path, metadata)
    updates: dict[str, Update] = {}
    for key in sorted(tensors):
        parsed = _parse(key, layout)
        if parsed is None:
            raise LoraError(f"LoRA {path}: key {key!r} is not a UNet LoRA weight ({layout} layout)")
        target, part = parsed
        u = updates.setdefault(target, Update(target, key, alpha=default_alpha))
        value = tensors[key]
        if part == "alpha":
            u.alpha = float(value.item())
        else:
            setattr(u, part, value)
            if part == "down":
                u.key = key
    for u in updates.values():
        if u.down is None or u.up is None:
            missing = "down" if u.down is None else "up"
            raise LoraError(f"LoRA {path}: key {u.key!r} has no {missing} matrix")
    return layout, list(updates.values())


def _delta_shape(u: Update) -> tuple[int, ...] | None:
    """The shape of up @ down, or None when the two do not chain (ranks differ)."""
    if u.up.dim() < 2 or u.down.dim() < 2 or any(s != 1 for s in u.up.shape[2:]):
        return None
    if u.up.shape[1] != u.down.shape[0]:
        return None
    return (u.up.shape[0], *u.down.shape[1:])


def check(unet: nn.Module, path: str) -> list[Update]:
    """The file's updates, each matched to a UNet weight of its shape (a meta-device UNet
    will do: only names and shapes are read); raises LoraError on the first that is not."""
    _, updates = read(path)
    params = dict(unet.named_parameters())
    for u in updates:
        weight = params.get(u.target)
        if weight is None:
            raise LoraError(f"LoRA {path}: key {u.key!r} targets {u.target}, not in the UNet")
        shape = _delta_shape(u)
        if shape != tuple(weight.shape):
            raise LoraError(
                f"LoRA {path}: key {u.key!r}: up {tuple(u.up.shape)} @ down "
                f"{tuple(u.down.shape)} does not fit {u.target} {tuple(weight.shape)}"
            )
    return updates


def fuse(unet: nn.Module, loras: list[tuple[str, float]]) -> int:
    """Fold `(path, scale)` LoRAs into `unet`'s weights in place; returns how many weights
    changed. Every file is checked before any weight changes."""
    import torch

    checked = [(check(unet, path), scale) for path, scale in loras]
    params = dict(unet.named_parameters())
    deltas: dict[str, torch.Tensor] = {}
    for updates, scale in checked:
        for u in updates:
            weight = params[u.target]
            up = u.up.to(weight.device, torch.float32).flatten(1)
            down = u.down.to(weight.device, torch.float32).flatten(1)
            delta = (up @ down).reshape(weight.shape) * (scale * u.factor())
            deltas[u.target] = deltas[u.target] + delta if u.target in deltas else delta
    with torch.no_grad():
        for target, delta in deltas.items():
            weight = params[target]
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(deltas)
