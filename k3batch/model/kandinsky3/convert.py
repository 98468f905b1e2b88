"""`k3batch convert`: a reference-layout checkpoint -> k3batch's diffusers family layout.

Reads the reference pickles once (`torch.load(weights_only=True)`), writes safetensors, so
later loads are fast and never unpickle. Components are written one at a time to keep peak
memory at the largest single component.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from k3batch.model import hub
from k3batch.model import loading as shared_loading
from k3batch.model.kandinsky3 import layout, loading
from k3batch.model.kandinsky3 import members as k3_members
from k3batch.model.member import Member

log = logging.getLogger(__name__)


def save_member(root: str, member: Member, unet, null_embedding) -> None:
    """One UNet (with its text projection) and its null embedding under its subfolder."""
    from safetensors.torch import save_file

    folder = os.path.join(root, member.unet_folder)
    unet.save_pretrained(folder)
    if null_embedding is not None:
        save_file(
            {"null_embedding": null_embedding.detach().contiguous()},
            os.path.join(folder, layout.NULL_EMBEDDING_FILE),
        )


def _scheduler_and_index(dst: str, tokenizer, with_base: bool) -> None:
    """What makes the base member loadable by diffusers' Kandinsky3Pipeline too."""
    import diffusers
    from diffusers import DDPMScheduler

    # Not used by k3batch (it samples with the reference schedule); diffusers' pipeline needs one.
    DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, variance_type="fixed_small"
    ).save_pretrained(os.path.join(dst, "scheduler"))
    if not with_base:
        return
    index = {
        "_class_name": "Kandinsky3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "movq": ["diffusers", "VQModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "unet": ["diffusers", "Kandinsky3UNet"],
    }
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def convert(
    src: str,
    dst: str,
    members: list[str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Convert the members found in `src` (or those named); returns the members written."""
    from transformers import AutoTokenizer, T5EncoderModel

    if os.path.exists(dst) and os.listdir(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty (use --overwrite)")
        shutil.rmtree(dst)
    unknown = [n for n in members or () if n not in k3_members.NAMES]
    if unknown:
        # Kandinsky 2.2 ships in diffusers' layout already: nothing to convert.
        raise KeyError(f"--members: {', '.join(unknown)} not one of {', '.join(k3_members.NAMES)}")
    wanted = [k3_members.MEMBERS[n] for n in (members or k3_members.NAMES)]
    if hub.is_hub_id(src):
        src = loading.reference_download(src, wanted)
    root = layout.reference_root(src)
    if root is None:
        raise FileNotFoundError(f"{src}: no reference-layout checkpoint (weights/movq.pt) found")
    found = [m for m in wanted if os.path.exists(os.path.join(root, m.reference_file))]
    if members and len(found) != len(wanted):
        missing = [m.reference_file for m in wanted if m not in found]
        raise FileNotFoundError(f"{root} lacks {', '.join(missing)}")
    if not found:
        raise FileNotFoundError(f"{root} holds none of the family's UNet files")
    target = shared_loading.DTYPES[dtype] if dtype else None
    os.makedirs(dst, exist_ok=True)

    text_dir = os.path.join(root, layout.REFERENCE_TEXT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.save_pretrained(os.path.join(dst, "tokenizer"))
    text_encoder = T5EncoderModel.from_pretrained(text_dir, dtype=target or "auto")
    text_encoder.save_pretrained(os.path.join(dst, "text_encoder"))
    del text_encoder
    movq = loading.reference_movq(root)
    shared_loading.cast(movq, "cpu", target or torch.float32).save_pretrained(
        os.path.join(dst, "movq")
    )
    del movq
    for m in found:
        log.info("converting %s", m.reference_file)
        unet, null = loading.reference_unet(root, m)
        save_member(dst, m, shared_loading.cast(unet, "cpu", target or torch.float32), null)
        del unet
    _scheduler_and_index(dst, tokenizer, with_base=k3_members.MEMBERS[k3_members.BASE] in found)
    with open(os.path.join(dst, "k3batch_family.json"), "w") as f:
        json.dump(
            {"source": os.path.abspath(src), "members": [m.name for m in found], "dtype": dtype},
            f,
            indent=2,
        )
    return [m.name for m in found]
