"""The Kandinsky 2.2 members (a CLIP prior + an image-conditioned decoder), declared once, and
where their parts load from. Torch-free."""

from __future__ import annotations

import os

from k3batch.model.member import Member

FAMILY = "kandinsky2.2"
K22 = "kandinsky2.2"
K22_INPAINT = "kandinsky2.2-inpaint"
K22_DEPTH = "kandinsky2.2-controlnet-depth"

PRIOR_REPO = "kandinsky-community/kandinsky-2-2-prior"
GUIDANCE = "uncond + w*(cond - uncond), off at w <= 1"
# Components only Kandinsky 2.2 members load (dtype and device keys beside unet,
# text_encoder and movq).
EXTRA_COMPONENTS = ("prior", "image_encoder", "depth_estimator")

# The diffusers folders of Kandinsky 2.2: a decoder (any of the three members) and the prior.
DECODER_PARTS = ("unet", "movq", "scheduler")
PRIOR_PARTS = ("prior", "text_encoder", "tokenizer", "image_encoder", "image_processor")

# The tiny Kandinsky 2.2 set (`model.make_tiny`, k3batch.testing.tiny_k22): one directory
# at `model.path` with a folder per decoder, the prior and a depth estimator.
TINY_FOLDERS = {K22: "decoder", K22_INPAINT: "decoder-inpaint", K22_DEPTH: "controlnet-depth"}
TINY_PRIOR = "prior"
TINY_DEPTH = "depth"


def _member(name: str, repo: str, summary: str, in_channels: int = 4, **fields) -> Member:
    # Defaults as diffusers' KandinskyV22 pipelines: decoder 100 steps at guidance 4,
    # prior 25 steps at guidance 4; prompts go through CLIP's 77 tokens.
    return Member(
        name,
        FAMILY,
        in_channels=in_channels,
        num_inference_steps=100,
        guidance_scale=4.0,
        summary=summary,
        text_encoder="CLIP ViT-bigG-14 (prior)",
        max_prompt_tokens=77,
        guidance_formula=GUIDANCE,
        prior_num_inference_steps=25,
        prior_guidance_scale=4.0,
        default_path=f"kandinsky-community/{repo}",
        **fields,
    )


MEMBERS = {
    K22: _member(
        K22,
        "kandinsky-2-2-decoder",
        "Kandinsky 2.2 (prior + decoder): text-to-image, image-to-image for rows with an "
        "`image`, image mixing for rows with `mix`",
        image_input="optional",
        mixes=True,
    ),
    K22_INPAINT: _member(
        K22_INPAINT,
        "kandinsky-2-2-decoder-inpaint",
        "Kandinsky 2.2 inpainting, rows carry `image` and `mask`",
        in_channels=9,
        image_input="required",
        needs_mask=True,
    ),
    K22_DEPTH: _member(
        K22_DEPTH,
        "kandinsky-2-2-controlnet-depth",
        "Kandinsky 2.2 ControlNet depth: a `hint` depth image per row, or one estimated "
        "from `image` (`model.depth_estimator`)",
        image_input="optional",
        needs_hint=True,
    ),
}


def paths(model) -> dict[str, str | None]:
    """Where a member's parts load from (`model` a ModelConfig): `decoder`, `prior` and
    `depth_estimator` (None: rows bring their hints)."""
    decoder, prior = model.path, model.prior_path or PRIOR_REPO
    if model.make_tiny:
        decoder = os.path.join(model.path, TINY_FOLDERS[model.name])
        prior = model.prior_path or os.path.join(model.path, TINY_PRIOR)
    return {"decoder": decoder, "prior": prior, "depth_estimator": model.depth_estimator}


def missing_parts(path: str, parts: tuple[str, ...]) -> list[str]:
    """What a local decoder or prior folder lacks (empty when complete or a Hub id)."""
    if not os.path.isdir(path):
        return []
    return [w for w in parts if not os.path.exists(os.path.join(path, w))]
