"""Run the Kandinsky 3 IP-Adapter of ai-forever/kandinsky3-diffusers against k3batch's.

Not part of the test suite: it needs a checkout of ai-forever/kandinsky3-diffusers and einops
(which the project does not depend on). It imports the fork's own `UNetKandi3IpAdapter` and
`Kandi3AttnProcessorIpAdapter` from the checkout (nothing is copied), and

1. builds the fork's full-size `UNetKandi3IpAdapter` on the meta device (its
   `set_ip_processors` hard-codes the adapter layers and their sizes) and compares every
   adapter parameter name and shape with `ip_adapter.IPAdapter` on diffusers' full-size
   `Kandinsky3UNet`;
2. builds the fork's UNet at the tiny base UNet's sizes, with the fork's adapter processor on
   every cross-attention layer (the rule its hard-coded list follows; the list itself only
   fits the full size), loads the tiny base UNet (converted to the reference layout with
   k3batch's key map) and the tiny adapter file written by `make_tiny_ip_adapter` into it
   strictly, and compares one UNet call with k3batch's (`ip_adapter.load` on the same
   files) at several image weights (`img_weight`, k3batch's `ip_adapter_scale`).

    python scripts/check_reference_ip_adapter.py /path/to/kandinsky3-diffusers [--record DIR]

The tiny base UNet and adapter, the inputs and k3batch's side are
`k3batch.testing.reference_goldens`'; `--record DIR` writes the inputs and the fork's outputs
as DIR/ip_adapter_unet.npz (and .json) for tests/test_goldens.py.

The fork's package `__init__` needs an older huggingface_hub, so its modules are imported under
empty package objects whose `utils`, `configuration_utils` and `models.modeling_utils` are the
installed diffusers' (the fork is a diffusers fork; the names it takes from them are the same);
matplotlib, imported but unused by its attention_processor, is stubbed when absent.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import tempfile
import types

import diffusers.configuration_utils
import diffusers.models.modeling_utils
import diffusers.utils
import diffusers.utils.import_utils
import torch
from diffusers import Kandinsky3UNet

from k3batch.model.adapters import ip_adapter
from k3batch.model.kandinsky3 import keymap
from k3batch.model.kandinsky3.loading import REFERENCE_UNET_CONFIG
from k3batch.testing import reference_goldens as golden
from k3batch.testing.tiny_ip_adapter import TINY_IMAGE_EMBED_DIM
from k3batch.testing.tiny_parts import TINY_UNET

TOLERANCE = 5e-5  # float32 (einsum softmax vs scaled_dot_product_attention), relative


def _fork(checkout: str) -> types.ModuleType:
    """The fork's `models.unet_kandi3`, imported from the checkout without its package init."""
    if importlib.util.find_spec("matplotlib") is None:
        plt = types.ModuleType("matplotlib.pyplot")
        sys.modules.update({"matplotlib": types.ModuleType("matplotlib"), "matplotlib.pyplot": plt})
    from diffusers.utils.torch_utils import maybe_allow_in_graph

    utils = types.ModuleType("kandinsky3_diffusers.utils")
    utils.__dict__.update({k: getattr(diffusers.utils, k) for k in ("BaseOutput", "deprecate")})
    utils.logging, utils.maybe_allow_in_graph = diffusers.utils.logging, maybe_allow_in_graph
    src = os.path.join(checkout, "src", "kandinsky3_diffusers")
    pkg, models = types.ModuleType("kandinsky3_diffusers"), types.ModuleType("x")
    pkg.__path__, models.__path__ = [src], [os.path.join(src, "models")]
    models.__name__ = "kandinsky3_diffusers.models"
    sys.modules.update(
        {
            "kandinsky3_diffusers": pkg,
            "kandinsky3_diffusers.models": models,
            "kandinsky3_diffusers.utils": utils,
            "kandinsky3_diffusers.utils.import_utils": diffusers.utils.import_utils,
            "kandinsky3_diffusers.configuration_utils": diffusers.configuration_utils,
            "kandinsky3_diffusers.models.modeling_utils": diffusers.models.modeling_utils,
        }
    )
    return importlib.import_module("kandinsky3_diffusers.models.unet_kandi3")


def _adapter_shapes(state) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if ip_adapter.is_adapter_key(k)}


def check_names_and_shapes(fork) -> None:
    """Step 1: the full-size adapter, the fork's hard-coded layers vs ours, on meta."""
    mc = REFERENCE_UNET_CONFIG["block_out_channels"][0]
    with torch.device("meta"), contextlib.redirect_stdout(open(os.devnull, "w")):
        theirs = fork.UNetKandi3IpAdapter(
            model_channels=mc,
            init_channels=mc // 2,
            num_channels=4,
            time_embed_dim=REFERENCE_UNET_CONFIG["time_embedding_dim"],
        )
        ours = ip_adapter.IPAdapter(Kandinsky3UNet(in_channels=4, **REFERENCE_UNET_CONFIG))
    a, b = _adapter_shapes(theirs.state_dict()), _adapter_shapes(ours.reference_state_dict())
    only_fork, only_ours = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    wrong = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    layers = sum(k.endswith("to_key_ip.weight") for k in a)
    print(f"full size: fork {len(a)} adapter tensors ({layers} layers), k3batch {len(b)}")
    assert not only_fork and not only_ours and not wrong, (only_fork, only_ours, wrong)
    print("full size: every adapter name and shape agrees")


def _tiny_fork_unet(fork):
    """The fork's UNet at the tiny sizes, its adapter processor on every cross-attention."""
    mc = TINY_UNET["block_out_channels"][0]
    cls = fork.UNetKandi3IpAdapter
    hard_coded = cls.set_ip_processors
    cls.set_ip_processors = lambda self: None  # its names and sizes fit the full size only
    try:
        unet = cls(
            model_channels=mc,
            init_channels=mc // 2,
            num_channels=4,
            time_embed_dim=TINY_UNET["time_embedding_dim"],
            groups=TINY_UNET["groups"],
            head_dim=TINY_UNET["attention_head_dim"],
            dim_mult=tuple(c // mc for c in TINY_UNET["block_out_channels"]),
            model_dim=TINY_UNET["encoder_hid_dim"],
            context_dim=TINY_UNET["cross_attention_dim"],
            image_embedding_dim=TINY_IMAGE_EMBED_DIM,
        )
    finally:
        cls.set_ip_processors = hard_coded
    ip_cls = sys.modules["kandinsky3_diffusers.models.attention_processor"]
    cross = re.compile(r"resnet_attn_blocks\.\d+\.1\.attention$")
    for name, m in unet.named_modules():
        if cross.search(name) and hasattr(m, "set_processor"):
            dim = m.to_query.out_features
            m.set_processor(
                ip_cls.Kandi3AttnProcessorIpAdapter(dim, dim, TINY_UNET["cross_attention_dim"])
            )
    return unet.eval()


def check_tiny_forward(fork, workdir: str, checkout: str, record: str | None) -> float:
    """Step 2: one UNet call of the fork and of k3batch on the same tiny weights."""
    base = golden.ip_base_unet()
    adapter_file = golden.ip_adapter_file(os.path.join(workdir, "ip_adapter"), base)
    weights = golden.ip_weights(base, adapter_file)

    theirs = _tiny_fork_unet(fork)
    state = {}
    for k, v in base.state_dict().items():
        if k.startswith("encoder_hid_proj."):
            k = k.replace("encoder_hid_proj.projection_linear.", "projection_lin.")
            k = k.replace("encoder_hid_proj.projection_norm.", "projection_ln.")
            state[k] = v
        else:
            state[keymap.unet_to_reference(k)] = v
    state.update(ip_adapter.read_weights(adapter_file))
    theirs.load_state_dict(state, strict=True)

    inputs = golden.ip_inputs()
    x, t, ctx, mask, emb = (
        torch.from_numpy(inputs[k]) for k in ("x", "t", "context", "mask", "image_embeds")
    )
    ours = golden.ip_side(base, adapter_file, inputs)
    worst, refs = 0.0, {}
    with torch.no_grad():
        for i, scale in enumerate(golden.IP_SCALES):
            ref = theirs(
                x, t, context=ctx, context_mask=mask, use_projections=True,
                image_features=emb, img_weight=scale,
            ).sample  # fmt: skip
            refs[f"scale_{i}"] = ref
            got = torch.from_numpy(ours[f"scale_{i}"])
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            moved = (got - torch.from_numpy(ours["plain"])).abs().max().item()
            print(f"tiny, img_weight {scale}: max rel. difference {err:.2e}"
                  f" (image branch moves the output by {moved:.3f})")  # fmt: skip
            worst = max(worst, err)
    assert worst < TOLERANCE, worst
    if record:
        meta = golden.metadata(
            "kandinsky3-diffusers",
            checkout,
            "scripts/check_reference_ip_adapter.py",
            {"scales": golden.IP_SCALES, "base_seed": 0, "inputs_seed": 5},
            weights,
        )
        golden.save(record, golden.IP_ADAPTER_CASE, {**inputs, **refs}, meta)
    return worst


def main(checkout: str, record: str | None = None) -> None:
    fork = _fork(checkout)
    check_names_and_shapes(fork)
    worst = check_tiny_forward(fork, tempfile.mkdtemp(prefix="k3-ip-ref-"), checkout, record)
    print(f"OK: the fork and k3batch agree (worst relative difference {worst:.1e})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="a checkout of ai-forever/kandinsky3-diffusers")
    parser.add_argument("--record", metavar="DIR", help="write the case's golden files to DIR")
    args = parser.parse_args()
    main(args.checkout, args.record)
