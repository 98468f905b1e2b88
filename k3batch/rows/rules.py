"""`RowRules`: the defaults and limits each row is checked against, and what its job's rows may
bring (`capabilities`), from the job config."""

from __future__ import annotations

from dataclasses import dataclass, field

from k3batch import schema
from k3batch.model import samplers
from k3batch.rows.capabilities import RowCapabilities


def _default_capabilities() -> RowCapabilities:
    # The default member (`model.name`'s default), plain: what a job without a model section has.
    from k3batch.model import family

    return family.default_row_capabilities()


@dataclass(frozen=True)
class RowRules:
    """Defaults and limits a row is checked against (from the job config)."""

    negative_prompt: str | None = None
    seed: int = 0
    width: int = 1024
    height: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float | None = 3.0
    strength: float = 0.3
    num_images_per_prompt: int = 1
    scheduler: str = samplers.REFERENCE
    # What rows may bring, and the member they run on.
    capabilities: RowCapabilities = field(default_factory=_default_capabilities)
    # A prior's defaults (members with one).
    prior_num_inference_steps: int | None = None
    prior_guidance_scale: float | None = None
    # A hinted row's ControlNet settings; the fork's defaults.
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    # The IP-Adapter's scale of a row with image prompts; the fork's default.
    ip_adapter_scale: float = 1.0
    max_side: int = 2048
    max_num_inference_steps: int = 1000
    max_prompt_chars: int = 20000
    max_num_images_per_prompt: int = 64
    # The column giving a row's number of images; None: one image per row whatever the
    # input holds (`job: upscale`, whose input may be an earlier job's metadata).
    images_column: str | None = schema.NUM_IMAGES_PER_PROMPT

    @property
    def member(self):
        return self.capabilities.member

    @classmethod
    def from_config(cls, generation, limits, capabilities: RowCapabilities) -> RowRules:
        """The rules of a job's `generation:` and `limits:` for rows that may bring what
        `capabilities` says (`k3batch.model.family.row_capabilities(cfg.model)`)."""
        return cls(
            capabilities=capabilities,
            prior_num_inference_steps=generation.prior_num_inference_steps,
            prior_guidance_scale=generation.prior_guidance_scale,
            strength=generation.strength,
            scheduler=generation.scheduler,
            negative_prompt=generation.negative_prompt,
            seed=generation.seed,
            width=generation.width,
            height=generation.height,
            num_inference_steps=generation.num_inference_steps,
            guidance_scale=generation.guidance_scale,
            num_images_per_prompt=generation.num_images_per_prompt,
            max_side=limits.max_side,
            max_num_images_per_prompt=limits.max_num_images_per_prompt,
            max_num_inference_steps=limits.max_num_inference_steps,
            max_prompt_chars=limits.max_prompt_chars,
        )
