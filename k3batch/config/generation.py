"""`generation:` and `limits:`: the defaults every row starts from, the limits it is checked
against, and how a model member fills and refuses them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from k3batch.config.base import Strict
from k3batch.model import samplers

if TYPE_CHECKING:
    from k3batch.config.model import ModelConfig


def _multiple_of_64(v: int) -> int:
    if v <= 0 or v % 64:
        raise ValueError("must be a positive multiple of 64")
    return v


class GenerationConfig(Strict):
    """Defaults for every row; optional input columns of the same names override them."""

    num_inference_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Denoising steps (reference spacing range(999, 0, -1000//steps)); null = "
        "the model's default (50). Flash always runs its 4 fixed steps.",
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Classifier-free guidance weight w in (w+1)*cond - w*uncond (Kandinsky 3; "
        "Kandinsky 2.2's decoder: uncond + w*(cond - uncond), off at w <= 1); null = the "
        "model's default (3.0 base, 4.0 inpainting and Kandinsky 2.2). Flash uses no guidance.",
    )
    strength: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Image-to-image rows (base model, rows with an `image`): how far the input "
        "is noised; the last int(steps * strength) timesteps run (diffusers' rule and "
        "default). Near 0 returns the input, 1 ignores it.",
    )
    scheduler: Literal[samplers.NAMES] = Field(
        samplers.REFERENCE,
        description="Sampler of base and inpainting rows: "
        + samplers.describe()
        + ". The diffusers solvers run on the reference's cosine schedule (trailing timestep "
        "spacing), guidance and x0 thresholding, and need fewer steps (see "
        "models-and-numerics.md, Schedulers). Flash always runs its own 4 fixed steps.",
    )
    prior_num_inference_steps: int | None = Field(
        None,
        ge=2,
        le=1000,
        description="Kandinsky 2.2 only: the prior's denoising steps (UnCLIPScheduler, which "
        "needs at least 2); null = the member's default (25, as diffusers' "
        "KandinskyV22PriorPipeline).",
    )
    prior_guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Kandinsky 2.2 only: the prior's classifier-free guidance w in "
        "uncond + w*(cond - uncond), off at w <= 1; the negative prompt acts here. null = "
        "the member's default (4.0).",
    )
    width: int = Field(1024, description="Image width in pixels, a multiple of 64.")
    height: int = Field(1024, description="Image height in pixels, a multiple of 64.")
    negative_prompt: str | None = Field(
        None, description="Negative prompt for rows without their own; null for none."
    )
    num_images_per_prompt: int = Field(
        1,
        ge=1,
        description="Images per row (diffusers' name): image k of a row uses seed + k (k = 0 .. "
        "N-1; N seeds drawn when the seed is -1) and is its own record (`k`, key `<key>_<k>`); "
        "the N images share the row's text encoding. A `num_images_per_prompt` column "
        "overrides it per row.",
    )
    seed: int = Field(
        0,
        ge=-1,
        lt=2**63,
        description="Base seed. A row without its own `seed` gets one derived from this and its "
        "id; -1 picks a random seed per row. The seed used is recorded per row.",
    )

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int) -> int:
        return _multiple_of_64(v)

    @field_validator("guidance_scale", "prior_guidance_scale")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class LimitsConfig(Strict):
    max_side: int = Field(2048, ge=64, description="Largest allowed width or height of a row.")
    max_num_images_per_prompt: int = Field(
        64, ge=1, description="Largest allowed num_images_per_prompt of a row."
    )
    max_num_inference_steps: int = Field(
        1000, ge=1, le=1000, description="Largest allowed num_inference_steps of a row."
    )
    max_prompt_chars: int = Field(
        20000,
        ge=1,
        description="Longest allowed prompt in characters (the text encoder reads 128 tokens "
        "anyway; this guards the tokenizer against absurd rows).",
    )


def apply_member_defaults(generation: GenerationConfig, model: ModelConfig) -> None:
    """Fill null steps/guidance with the family member's own; refuse settings it cannot use.

    Shared by batch jobs and the Serve app, so both treat a member the same way.
    """
    from k3batch.model import family

    g, m = generation, model
    member, own = family.MEMBERS[m.name], family.of(m.name)
    prior_fields = ("prior_num_inference_steps", "prior_guidance_scale")
    if not member.has_prior:
        with_prior = ", ".join(
            f.title for f in family.FAMILIES.values() if any(x.has_prior for x in f.members)
        )
        for name in prior_fields:
            if getattr(g, name) is not None:
                raise ValueError(
                    f"generation.{name}: only {with_prior} members have a prior, not "
                    f"{m.name} (got {getattr(g, name)!r}); remove it"
                )
    else:
        for name in prior_fields:
            if getattr(g, name) is None:
                setattr(g, name, getattr(member, name))
    if own.own_schedulers and g.scheduler != samplers.REFERENCE:
        raise ValueError(
            f"generation.scheduler: {m.name} samples with {own.own_schedulers}, "
            f"not {g.scheduler!r}; remove it"
        )
    if m.refine and not member.refinable:
        refinable = ", ".join(family.members_with(refinable=True))
        raise ValueError(f"model.refine: works on {refinable} (base) jobs, not {m.name}")
    # Settings a member would not use are reported here rather than silently dropped.
    if not member.guided:
        if g.negative_prompt is not None:
            raise ValueError(
                f"generation.negative_prompt: {m.name} uses no guidance, so a "
                f"negative prompt has no effect (got {g.negative_prompt!r}); remove it"
            )
        if g.guidance_scale is not None:
            raise ValueError(
                f"generation.guidance_scale: {m.name} uses no guidance "
                f"(got {g.guidance_scale!r}); remove it"
            )
    elif g.guidance_scale is None:
        g.guidance_scale = member.guidance_scale
    if member.fixed_timesteps:
        if g.num_inference_steps not in (None, member.steps):
            raise ValueError(
                f"generation.num_inference_steps: {m.name} always runs {member.steps} steps at "
                f"{list(member.fixed_timesteps)} (got {g.num_inference_steps!r}); remove it"
            )
        g.num_inference_steps = member.steps
        if g.scheduler != samplers.REFERENCE:
            raise ValueError(
                f"generation.scheduler: {m.name} always runs its own {member.steps} fixed "
                f"steps (got {g.scheduler!r}); remove it"
            )
    elif g.num_inference_steps is None:
        g.num_inference_steps = member.num_inference_steps
