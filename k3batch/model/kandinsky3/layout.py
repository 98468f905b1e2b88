"""Where the Kandinsky 3 family's weights live on disk, in either layout. Torch-free.

- **diffusers layout** (k3batch's, what `k3batch convert` writes): one directory whose
  `tokenizer/`, `text_encoder/` and `movq/` are shared by every member, and one UNet
  subfolder per member (`unet/`, `unet_flash/`, `unet_inpaint/`). Each UNet carries its own
  text projection as `encoder_hid_proj` and its learned unconditional vector as
  `null_embedding.safetensors`. `model_index.json` + `scheduler/` keep the base member
  loadable by diffusers' `Kandinsky3Pipeline`; `kandinsky-community/kandinsky-3` is this
  layout with only `unet/`.
- **reference layout** (`ai-forever/Kandinsky3.1`): `weights/kandinsky3*.pt`
  (`{'unet', 'null_embedding'}`), `weights/flan_ul2_encoder/` (T5 encoder, tokenizer and
  `projection*.pt`), `weights/movq.pt`. The reference code hard-codes the architecture;
  a `k3batch_config.json` beside the weights (written by `make-tiny`) overrides it.

The conditioning models of the base member: a ControlNet folder, and the IP-Adapter (a weights
file or a folder holding one, with its CLIP image encoder).
"""

from __future__ import annotations

import json
import os

from k3batch.model.kandinsky3.members import members_needed

LAYOUT_DIFFUSERS = "diffusers"
LAYOUT_REFERENCE = "reference"

REFERENCE_WEIGHTS_DIR = "weights"
REFERENCE_TEXT_DIR = "flan_ul2_encoder"
REFERENCE_MOVQ_FILE = "movq.pt"
REFERENCE_CONFIG_FILE = "k3batch_config.json"
NULL_EMBEDDING_FILE = "null_embedding.safetensors"
# The IP-Adapter (`model.ip_adapter`): a weights file, or a folder holding this one; its CLIP
# image encoder. The fork's pipeline names no encoder checkpoint; its adapter takes 768-d
# embeddings, the width of OpenAI's ViT-L/14 (which ships its processor).
IP_ADAPTER_FILE = "ip_adapter.safetensors"
IP_ADAPTER_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
IP_ADAPTER_ENCODER_FOLDER = "image_encoder"  # beside the file in the tiny set
# The tiny set's IP-Adapter folder (weights + image_encoder/; k3batch.testing.tiny).
TINY_IP_ADAPTER_FOLDER = "ip_adapter"


def reference_root(path: str) -> str | None:
    """The `weights/` directory of a local reference-layout checkpoint, or None."""
    for root in (os.path.join(path, REFERENCE_WEIGHTS_DIR), path):
        if os.path.isfile(os.path.join(root, REFERENCE_MOVQ_FILE)) and os.path.isdir(
            os.path.join(root, REFERENCE_TEXT_DIR)
        ):
            return root
    return None


def detect_layout(path: str, layout: str = "auto") -> str:
    """`diffusers` or `reference` for a local directory or a Hugging Face repo id."""
    if layout != "auto":
        return layout
    if os.path.isdir(path):
        return LAYOUT_REFERENCE if reference_root(path) else LAYOUT_DIFFUSERS
    from huggingface_hub import file_exists, try_to_load_from_cache

    ref_file = f"{REFERENCE_WEIGHTS_DIR}/{REFERENCE_MOVQ_FILE}"
    try:
        found = file_exists(path, ref_file)
    except Exception:  # noqa: BLE001 - offline (HF_HUB_OFFLINE) or unreachable: ask the cache
        found = isinstance(try_to_load_from_cache(path, ref_file), str)
    return LAYOUT_REFERENCE if found else LAYOUT_DIFFUSERS


def missing_files(path: str, name: str, refine: bool, layout: str = "auto") -> list[str]:
    """What a local checkpoint lacks for a job (empty when complete). Hub ids: not checked."""
    if not os.path.isdir(path):
        return []
    layout = detect_layout(path, layout)
    needed = members_needed(name, refine)
    if layout == LAYOUT_REFERENCE:
        root = reference_root(path) or os.path.join(path, REFERENCE_WEIGHTS_DIR)
        wanted = [REFERENCE_MOVQ_FILE, REFERENCE_TEXT_DIR]
        for m in needed:
            wanted += [m.reference_file, f"{REFERENCE_TEXT_DIR}/{m.projection_file}"]
    else:
        root = path
        wanted = ["tokenizer", "text_encoder", "movq", *(m.unet_folder for m in needed)]
    return [w for w in wanted if not os.path.exists(os.path.join(root, w))]


def read_reference_config(root: str) -> dict:
    file = os.path.join(root, REFERENCE_CONFIG_FILE)
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)


def ip_adapter_file(path: str) -> str:
    """The IP-Adapter's weights: `path` itself, or `ip_adapter.safetensors` in the folder."""
    return os.path.join(path, IP_ADAPTER_FILE) if os.path.isdir(path) else path


def ip_adapter_paths(model) -> tuple[str, str] | None:
    """(adapter weights, image encoder) of `model.ip_adapter`, nulls resolved (the tiny set's
    with `model.make_tiny`); None without it."""
    if model.ip_adapter is None:
        return None
    tiny = os.path.join(model.path, TINY_IP_ADAPTER_FOLDER)
    path = model.ip_adapter.path or tiny
    encoder = model.ip_adapter.image_encoder
    if encoder is None:
        encoder = (
            os.path.join(tiny, IP_ADAPTER_ENCODER_FOLDER)
            if model.make_tiny
            else IP_ADAPTER_IMAGE_ENCODER
        )
    return path, encoder
