"""A row's sampling settings: steps, guidance, scheduler and strength, as the member uses them.
A member without guidance or with fixed timesteps reports a row's own values as ignored
(a warning), and records what it runs."""

from __future__ import annotations

import math

from k3batch import schema
from k3batch.model import samplers
from k3batch.rows.values import RowError, as_float, as_int, as_text, show


def ignored_settings(row) -> None:
    member = row.member
    unused = []
    if not member.guided:
        unused += [("negative_prompt", None), ("guidance_scale", 0.0)]
    if member.fixed_timesteps:
        unused += [("num_inference_steps", member.steps), ("scheduler", samplers.REFERENCE)]
    why = ", ".join(
        ([] if member.guided else ["no guidance"])
        + ([f"{member.steps} fixed steps"] if member.fixed_timesteps else [])
    )
    for name, used in unused:
        value = row.raw.get(name)
        if value is not None and value != used and not (name == "negative_prompt" and not value):
            row.warnings.append(f"{name}: ignored by {member.name} ({why}), got {show(value)}")


def steps(row) -> None:
    member, limit = row.member, row.rules.max_num_inference_steps

    def check(v):
        if v < 1:
            raise RowError(f"num_inference_steps: must be >= 1, got {v}")
        if v > limit:
            raise RowError(
                f"num_inference_steps: {v} is above limits.max_num_inference_steps={limit}"
            )
        return v

    if member.fixed_timesteps:
        row.out[schema.NUM_INFERENCE_STEPS] = member.steps
    else:
        row.out[schema.NUM_INFERENCE_STEPS] = row.field("num_inference_steps", as_int, check)


def guidance(row) -> None:
    def check(v):
        if not math.isfinite(v):
            raise RowError(f"guidance_scale: must be finite, got {v}")
        if v < 0:
            raise RowError(f"guidance_scale: must be >= 0, got {v}")
        return v

    if not row.member.guided:
        row.out[schema.NEGATIVE_PROMPT] = None
        row.out[schema.GUIDANCE_SCALE] = None
    else:
        row.out[schema.GUIDANCE_SCALE] = row.field("guidance_scale", as_float, check)


def scheduler(row) -> None:
    def check(v):
        if v not in samplers.NAMES:
            raise RowError(f"scheduler: unknown {show(v)}, one of {', '.join(samplers.NAMES)}")
        return v

    # Flash rows record "reference": they run the reference's Flash steps.
    row.out[schema.SCHEDULER] = samplers.REFERENCE
    if row.capabilities.own_schedulers:
        value = row.raw.get(schema.SCHEDULER)
        if value is not None and value != samplers.REFERENCE:
            row.warnings.append(
                f"scheduler: ignored by {row.member.name} (its own diffusers schedulers), "
                f"got {show(value)}"
            )
    elif not row.member.fixed_timesteps:
        row.out[schema.SCHEDULER] = row.field("scheduler", as_text, check)


def strength(row) -> None:
    def check(v):
        if not (math.isfinite(v) and 0 < v <= 1):
            raise RowError(f"strength: must be in (0, 1], got {v}")
        return v

    row.out[schema.STRENGTH] = None
    image_to_image = row.has_image and row.member.image_input == "optional"
    given = row.raw.get(schema.STRENGTH)
    if given is not None and not image_to_image:
        takers = row.capabilities.takers["strength"]
        row.warnings.append(
            f"strength: ignored, only image-to-image rows ({takers} with an image) use it, "
            f"got {show(given)}"
        )
    elif image_to_image:
        row.out[schema.STRENGTH] = row.field("strength", as_float, check)
