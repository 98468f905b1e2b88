"""The Kandinsky 3.1 family: members, their defaults, and where their weights live.

Torch-free: the config and the pre-flight checks use it before any model loads.

Two on-disk layouts hold the family:

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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

BASE = "kandinsky3"
FLASH = "kandinsky3-flash"
INPAINT = "kandinsky3-inpaint"
K22 = "kandinsky2.2"
K22_INPAINT = "kandinsky2.2-inpaint"
K22_DEPTH = "kandinsky2.2-controlnet-depth"

# Member.family: the Kandinsky 3.1 members share T5, MoVQ and the reference's samplers; the
# Kandinsky 2.2 members are a CLIP prior + an image-conditioned decoder (kandinsky22.py).
KANDINSKY3 = "kandinsky3"
KANDINSKY22 = "kandinsky2.2"
KANDINSKY22_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
K3_GUIDANCE = "(w+1)*cond - w*uncond"
K22_GUIDANCE = "uncond + w*(cond - uncond), off at w <= 1"

FLASH_TIMESTEPS = (979, 729, 479, 229)  # range(979, 0, -250) of the reference
REFINE_TIMESTEP = 229  # one Flash step, as the 3.1 release and KandiSuperRes refine

# KandiSuperRes (ai-forever/KandiSuperRes): `upscale.model` -> (scale, the published file).
SUPERRES = {
    "x4": (4, "KandiSuperRes.ckpt"),
    "x2": (2, "KandiSuperRes_x2.ckpt"),
    "flash-x2": (2, "KandiSuperRes_flash_x2.pt"),
}

LAYOUT_DIFFUSERS = "diffusers"
LAYOUT_REFERENCE = "reference"

REFERENCE_WEIGHTS_DIR = "weights"
REFERENCE_TEXT_DIR = "flan_ul2_encoder"
REFERENCE_MOVQ_FILE = "movq.pt"
REFERENCE_CONFIG_FILE = "k3batch_config.json"
NULL_EMBEDDING_FILE = "null_embedding.safetensors"
# The Kandinsky 3 IP-Adapter (`model.ip_adapter`): a weights file, or a folder holding this
# one; its CLIP image encoder. The fork's pipeline names no encoder checkpoint; its adapter
# takes 768-d embeddings, the width of OpenAI's ViT-L/14 (which ships its processor).
IP_ADAPTER_FILE = "ip_adapter.safetensors"
IP_ADAPTER_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
IP_ADAPTER_ENCODER_FOLDER = "image_encoder"  # beside the file in the tiny set


@dataclass(frozen=True)
class Member:
    """One model of the family, declared once: its weights, the reference's settings for it,
    and what it can do. Config validation, row normalisation, loading, sampling and Serve
    read these fields instead of testing member names, so a new member is one entry here."""

    name: str
    unet_folder: str  # diffusers layout
    reference_file: str  # reference layout, under weights/
    projection_file: str  # reference layout, under weights/flan_ul2_encoder/
    in_channels: int
    num_inference_steps: int | None  # default; None: fixed timesteps
    guidance_scale: float | None  # default; None: no classifier-free guidance
    threshold_percentile: float | None  # dynamic thresholding of x0; None: none
    summary: str = ""  # one line for the config reference (`model.name`)
    # "none": text-to-image only; "optional": an `image` row is image-to-image (with
    # `strength`); "required": every row brings an image (and a mask, with `needs_mask`).
    image_input: str = "none"
    needs_mask: bool = False
    fixed_timesteps: tuple[int, ...] | None = None  # sampled at exactly these timesteps
    refinable: bool = False  # `model.refine`: a final Flash step at REFINE_TIMESTEP
    text_encoder: str = "flan-ul2 encoder"  # T5, shared by the family
    max_prompt_tokens: int = 128  # the text encoder's context; longer prompts are cut
    family: str = KANDINSKY3
    guidance_formula: str = K3_GUIDANCE  # how guidance_scale w combines the two branches
    # Kandinsky 2.2: the prior's defaults, a depth hint, the decoder's Hub repo.
    prior_num_inference_steps: int | None = None
    prior_guidance_scale: float | None = None
    needs_hint: bool = False
    default_path: str | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    @property
    def takes_image(self) -> bool:
        return self.image_input != "none"

    @property
    def steps(self) -> int | None:
        """Steps every row runs when they are fixed, else None (the row's own)."""
        return len(self.fixed_timesteps) if self.fixed_timesteps else None


MEMBERS = {
    BASE: Member(
        BASE,
        "unet",
        "kandinsky3.pt",
        "projection.pt",
        in_channels=4,
        num_inference_steps=50,
        guidance_scale=3.0,
        threshold_percentile=0.99,
        summary="base text-to-image (and image-to-image for rows with an `image`)",
        image_input="optional",
        refinable=True,
    ),
    FLASH: Member(
        FLASH,
        "unet_flash",
        "kandinsky3_flash.pt",
        "projection_flash.pt",
        in_channels=4,
        num_inference_steps=None,
        guidance_scale=None,
        threshold_percentile=None,
        summary="Kandinsky 3.1 Flash, 4 fixed steps, no guidance",
        fixed_timesteps=FLASH_TIMESTEPS,
    ),
    INPAINT: Member(
        INPAINT,
        "unet_inpaint",
        "kandinsky3_inpainting.pt",
        "projection_inpainting.pt",
        in_channels=9,
        num_inference_steps=50,
        guidance_scale=4.0,
        threshold_percentile=0.95,
        summary="inpainting, rows carry `image` and `mask`",
        image_input="required",
        needs_mask=True,
    ),
}


def _k22(name: str, repo: str, summary: str, in_channels: int = 4, **fields) -> Member:
    # Defaults as diffusers' KandinskyV22 pipelines: decoder 100 steps at guidance 4,
    # prior 25 steps at guidance 4; prompts go through CLIP's 77 tokens.
    return Member(
        name,
        "unet",
        "",
        "",
        in_channels=in_channels,
        num_inference_steps=100,
        guidance_scale=4.0,
        threshold_percentile=None,
        summary=summary,
        text_encoder="CLIP ViT-bigG-14 (prior)",
        max_prompt_tokens=77,
        family=KANDINSKY22,
        guidance_formula=K22_GUIDANCE,
        prior_num_inference_steps=25,
        prior_guidance_scale=4.0,
        default_path=f"kandinsky-community/{repo}",
        **fields,
    )


MEMBERS.update(
    {
        K22: _k22(
            K22,
            "kandinsky-2-2-decoder",
            "Kandinsky 2.2 (prior + decoder): text-to-image, image-to-image for rows with an "
            "`image`, image mixing for rows with `mix`",
            image_input="optional",
        ),
        K22_INPAINT: _k22(
            K22_INPAINT,
            "kandinsky-2-2-decoder-inpaint",
            "Kandinsky 2.2 inpainting, rows carry `image` and `mask`",
            in_channels=9,
            image_input="required",
            needs_mask=True,
        ),
        K22_DEPTH: _k22(
            K22_DEPTH,
            "kandinsky-2-2-controlnet-depth",
            "Kandinsky 2.2 ControlNet depth: a `hint` depth image per row, or one estimated "
            "from `image` (`model.depth_estimator`)",
            in_channels=4,
            image_input="optional",
            needs_hint=True,
        ),
    }
)
NAMES = tuple(MEMBERS)
K3_NAMES = tuple(n for n, m in MEMBERS.items() if m.family == KANDINSKY3)

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def members_with(**capabilities) -> list[str]:
    """Names of the members whose fields equal these, e.g. `members_with(needs_mask=True)`."""
    return [
        m.name for m in MEMBERS.values() if all(getattr(m, k) == v for k, v in capabilities.items())
    ]


def members_needed(name: str, refine: bool = False) -> list[Member]:
    """The members a job loads: its own, plus Flash when a base job refines."""
    needed = [MEMBERS[name]]
    if refine and MEMBERS[name].refinable:
        needed.append(MEMBERS[FLASH])
    return needed


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


# The diffusers folders of Kandinsky 2.2: a decoder (any of the three members) and the prior.
K22_DECODER_PARTS = ("unet", "movq", "scheduler")
K22_PRIOR_PARTS = ("prior", "text_encoder", "tokenizer", "image_encoder", "image_processor")


def missing_prior_files(path: str) -> list[str]:
    """What a local Kandinsky 2.2 prior folder lacks (empty when complete or a Hub id)."""
    if not os.path.isdir(path):
        return []
    return [w for w in (*K22_PRIOR_PARTS, "scheduler") if not os.path.exists(os.path.join(path, w))]


def missing_files(path: str, name: str, refine: bool, layout: str = "auto") -> list[str]:
    """What a local checkpoint lacks for a job (empty when complete). Hub ids: not checked.
    Kandinsky 2.2: `path` is the member's decoder folder (its prior: `missing_prior_files`)."""
    if not os.path.isdir(path):
        return []
    if MEMBERS[name].family == KANDINSKY22:
        return [w for w in K22_DECODER_PARTS if not os.path.exists(os.path.join(path, w))]
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


def is_hub_id(path: str) -> bool:
    return bool(_HF_REPO_ID.match(path)) and not os.path.exists(path)


def read_reference_config(root: str) -> dict:
    file = os.path.join(root, REFERENCE_CONFIG_FILE)
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)


def ip_adapter_file(path: str) -> str:
    """The IP-Adapter's weights: `path` itself, or `ip_adapter.safetensors` in the folder."""
    import os

    return os.path.join(path, IP_ADAPTER_FILE) if os.path.isdir(path) else path
