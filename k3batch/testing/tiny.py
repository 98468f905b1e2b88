"""Tiny random-weight Kandinsky 3 family checkpoints, built offline, in either real layout.

Same architecture classes as the real models (Kandinsky3UNet for base and Flash, its 9-in
variant for inpainting, an x8 SpatialNorm MoVQ, a T5 encoder and a T5 tokenizer), with small
widths, so tests and the demo run the real loading and sampling code on a CPU in seconds.
Weights are random but seeded: every machine that builds the model gets the same weights, so
a cluster's workers can each build their own (bit for bit where the CPUs' instruction sets
match: without AVX2, torch's random fills round an ulp differently). The parts are in
`testing.tiny_parts`.
"""

from __future__ import annotations

import json
import os

from k3batch.model.kandinsky3 import layout as k3_layout
from k3batch.model.kandinsky3 import members as k3_members
from k3batch.testing.build_once import build_dir
from k3batch.testing.tiny_parts import (
    MARKER,
    TINY_FORMAT,
    TINY_MOVQ,
    TINY_SEED,
    TINY_UNET,
    build_components,
)


def is_tiny_checkpoint(path: str, layout: str | None = None, size: str = "tiny") -> bool:
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        info = json.load(f)
    return (
        info.get("format") == TINY_FORMAT
        and layout in (None, info.get("layout"))
        and info.get("size", "tiny") == size
    )


def make_tiny(
    path: str,
    null_embedding: bool = True,
    overwrite: bool = False,
    layout: str = "diffusers",
    size: str = "tiny",
) -> str:
    """Write a tiny checkpoint of the whole family to `path`, once however many processes ask
    at the same time (`testing.build_once`).

    `layout`: `diffusers` (k3batch's family layout) or `reference` (ai-forever/Kandinsky3.1's
    `weights/` files, with a `k3batch_config.json` for the tiny architecture). `size`:
    `tiny`, or `bench` (diffusers layout only) for the CPU benchmarks.
    """
    if size != "tiny" and layout != "diffusers":
        raise ValueError(f"the {size!r} size is written in the diffusers layout only")
    if layout not in ("diffusers", "reference"):
        raise ValueError(f"layout must be diffusers or reference, got {layout!r}")

    def write(tmp: str) -> None:
        parts = build_components(null_embedding=null_embedding, size=size)
        if layout == "reference":
            _write_reference(tmp, parts)
        else:
            _write_diffusers(tmp, parts)
            if size == "tiny":
                from k3batch.testing.tiny_ip_adapter import make_tiny_ip_set

                make_tiny_controlnet(os.path.join(tmp, CONTROLNET_FOLDER))
                base_unet = parts["unets"][k3_members.BASE][0]
                make_tiny_ip_set(os.path.join(tmp, k3_layout.TINY_IP_ADAPTER_FOLDER), base_unet)
        with open(os.path.join(tmp, MARKER), "w") as f:  # last: the set is complete
            json.dump(
                {
                    "format": TINY_FORMAT,
                    "layout": layout,
                    "seed": TINY_SEED,
                    "null_embedding": null_embedding,
                    "size": size,
                },
                f,
            )

    return build_dir(
        path, write, lambda p: is_tiny_checkpoint(p, layout, size), overwrite=overwrite
    )


def _write_diffusers(root: str, parts: dict) -> None:
    from diffusers import Kandinsky3Pipeline

    from k3batch.model.kandinsky3.convert import save_member

    unets = parts["unets"]
    base_unet = unets[k3_members.BASE][0]
    pipe_parts = {k: parts[k] for k in ("tokenizer", "text_encoder", "movq", "scheduler")}
    Kandinsky3Pipeline(unet=base_unet, **pipe_parts).save_pretrained(root)
    for name, (unet, null) in unets.items():
        save_member(root, k3_members.MEMBERS[name], unet, null)


CONTROLNET_FOLDER = "controlnet_hed"  # the tiny Kandinsky 3 ControlNet inside a tiny set


def make_tiny_controlnet(path: str) -> str:
    """A random ControlNet matching the tiny base UNet, in the published folder layout.

    Every parameter random, the zero-initialised convs included: a trained ControlNet's are
    not zero, and zeros would make the ControlNet a no-op the tests could not see.
    """
    import torch

    from k3batch.model.adapters import controlnet

    config = controlnet.tiny_config(TINY_UNET)
    gen = torch.Generator().manual_seed(TINY_SEED + 7)
    model = controlnet.Kandinsky3ControlNet(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    controlnet.save(model, path)
    return path


def _write_reference(root: str, parts: dict) -> None:
    import torch

    from k3batch.model.kandinsky3 import keymap

    weights = os.path.join(root, k3_layout.REFERENCE_WEIGHTS_DIR)
    text_dir = os.path.join(weights, k3_layout.REFERENCE_TEXT_DIR)
    os.makedirs(text_dir)
    parts["text_encoder"].save_pretrained(text_dir)
    parts["tokenizer"].save_pretrained(text_dir)
    for name, (unet, null) in parts["unets"].items():
        member = k3_members.MEMBERS[name]
        ref_unet, projection = keymap.unet_state_to_reference(unet.state_dict())
        torch.save(
            {"unet": ref_unet, "null_embedding": null}, os.path.join(weights, member.reference_file)
        )
        torch.save(projection, os.path.join(text_dir, member.projection_file))
    levels = len(TINY_MOVQ["block_out_channels"])
    movq_state = keymap.movq_state_to_reference(parts["movq"].state_dict(), levels)
    torch.save(movq_state, os.path.join(weights, k3_layout.REFERENCE_MOVQ_FILE))
    unet_config = {k: v for k, v in TINY_UNET.items() if k != "encoder_hid_dim"}
    with open(os.path.join(weights, k3_layout.REFERENCE_CONFIG_FILE), "w") as f:
        json.dump({"unet": unet_config, "movq": TINY_MOVQ}, f, indent=2)
