"""Run ai-forever/kandinsky3-diffusers's own `UNetKandi3Controlnet` against k3batch's ControlNet.

Not part of the test suite: it needs a checkout of the fork and einops. It loads the fork's
`models/unet_kandi3.py`, `attention_processor.py` and `lora.py` from the checkout (nothing is
copied) under a stand-in package: the fork's `utils`, `modeling_utils` and
`configuration_utils` pull in the whole fork (hub, accelerate, matplotlib), so the names those
three modules are used for (BaseOutput, logging, deprecate, maybe_allow_in_graph,
is_xformers_available, ModelMixin, ConfigMixin, register_to_config) get minimal stand-ins
here, and matplotlib an empty module.

1. builds the fork's `UNetKandi3Controlnet` with its real config on the meta device and
   compares every parameter name and shape with k3batch's published-name state dict;
2. builds a tiny random k3batch ControlNet (four levels, three skips, like the real one),
   writes it as the published folder (`controlnet.save`), loads that file strictly into the
   fork's class, and compares the fork's residuals with k3batch's on the same latents,
   timestep, context, mask and hint.

    python scripts/check_reference_controlnet.py /path/to/kandinsky3-diffusers [--record DIR]

The tiny ControlNet, the inputs (the hint a random uint8 picture) and k3batch's side are
`k3batch.testing.reference_goldens`'; `--record DIR` writes the inputs and the fork's
residuals as DIR/controlnet_residuals.npz (and .json) for tests/test_goldens.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
import types

import diffusers.models.unets.unet_kandinsky3  # noqa: F401 - before the matplotlib stand-in
import torch
from torch import nn

from k3batch.model.adapters import controlnet as cn
from k3batch.testing import reference_goldens as golden

PKG = "k3fork"
REAL_FORK_CONFIG = dict(
    model_channels=384, init_channels=192, num_channels=4, time_embed_dim=1536, groups=32,
    head_dim=64, dim_mult=(1, 2, 4, 8), num_blocks=(3, 3, 3, 3), context_dim=4096,
    hint_channels=3,
)  # fmt: skip


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def _load(name: str, file: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fork(checkout: str):
    models = os.path.join(checkout, "src", "kandinsky3_diffusers", "models")

    class ConfigMixin:  # the fork's only use here: @register_to_config on __init__
        pass

    class BaseOutput(dict):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.__dict__.update(kw)

    def maybe_allow_in_graph(cls):
        return cls

    _module("matplotlib", pyplot=_module("matplotlib.pyplot"))
    _module(PKG).__path__ = []
    _module(
        f"{PKG}.utils",
        BaseOutput=BaseOutput,
        logging=types.SimpleNamespace(get_logger=logging.getLogger),
        deprecate=lambda *a, **k: None,
        maybe_allow_in_graph=maybe_allow_in_graph,
    )
    _module(f"{PKG}.utils.import_utils", is_xformers_available=lambda: False)
    _module(f"{PKG}.configuration_utils", ConfigMixin=ConfigMixin, register_to_config=lambda f: f)
    _module(f"{PKG}.models").__path__ = [models]
    _module(f"{PKG}.models.modeling_utils", ModelMixin=nn.Module)
    _load(f"{PKG}.models.lora", os.path.join(models, "lora.py"))
    _load(f"{PKG}.models.attention_processor", os.path.join(models, "attention_processor.py"))
    return _load(f"{PKG}.models.unet_kandi3", os.path.join(models, "unet_kandi3.py"))


def main(checkout: str, record: str | None = None) -> int:
    fork = _fork(checkout)
    ok = True

    # 1. real architecture: names and shapes
    with torch.device("meta"):
        theirs = fork.UNetKandi3Controlnet(**REAL_FORK_CONFIG)
        ours = cn.Kandinsky3ControlNet(**cn.config_from_reference(REAL_FORK_CONFIG))
    t_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    o_shapes = {
        cn.keymap.unet_to_reference(k): tuple(v.shape) for k, v in ours.state_dict().items()
    }
    same = t_shapes == o_shapes
    ok &= same
    n = sum(p.numel() for p in theirs.parameters())
    print(
        f"real config: {len(t_shapes)} tensors, {n / 1e6:.1f} M parameters, names+shapes equal: {same}"
    )
    if not same:
        print("  only fork:", sorted(set(t_shapes) - set(o_shapes))[:10])
        print("  only k3batch:", sorted(set(o_shapes) - set(t_shapes))[:10])

    # 2. tiny weights through the fork's own forward
    ours = golden.controlnet_model()
    with tempfile.TemporaryDirectory() as tmp:
        cn.save(ours, tmp)
        fork_cfg = cn.reference_config(ours.config)
        fork_cfg = {k: v for k, v in fork_cfg.items() if not k.startswith("_")}
        theirs = fork.UNetKandi3Controlnet(**fork_cfg).eval()
        theirs.load_state_dict(cn._read_state(tmp), strict=True)
    inputs = golden.controlnet_inputs()
    with torch.no_grad():
        ref = theirs(
            torch.from_numpy(inputs["x"]),
            torch.from_numpy(inputs["t"]),
            context=torch.from_numpy(inputs["context"]),
            context_mask=torch.from_numpy(inputs["mask"]).bool(),
            hint=golden.controlnet_hint(inputs),
        )
    got = golden.controlnet_side(ours, inputs)
    for level, a in enumerate(ref):
        b = torch.from_numpy(got[f"residual_{level}"])
        d = (a - b).abs().max().item()
        # random weights grow the activations to ~1e4: float32 rounding is relative
        good = d <= 1e-5 * a.abs().max().item()
        ok &= good
        print(
            f"tiny residual {level} {tuple(a.shape)}: max |diff| {d:.2e} (max |ref| {a.abs().max().item():.2e}) {'ok' if good else 'DIFFERS'}"
        )
    if record:
        weights = golden.weights_summary(ours.state_dict().items())
        meta = golden.metadata(
            "kandinsky3-diffusers",
            checkout,
            "scripts/check_reference_controlnet.py",
            {"config": golden.controlnet_config(), "seed": 0, "inputs_seed": 1},
            weights,
        )
        arrays = {**inputs, **{f"residual_{i}": r for i, r in enumerate(ref)}}
        golden.save(record, golden.CONTROLNET_CASE, arrays, meta)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a checkout of ai-forever/kandinsky3-diffusers")
    parser.add_argument("--record", metavar="DIR", help="write the case's golden files to DIR")
    args = parser.parse_args()
    sys.exit(main(args.checkout, args.record))
