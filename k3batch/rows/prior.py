"""A prior's settings (steps, guidance) and the `mix` items a mixing member weighs (images
and prompts), for members with a prior; on others, a setting is ignored with a warning and a
mix is an error."""

from __future__ import annotations

import math

from k3batch import schema
from k3batch.rows.values import RowError, as_float, as_int, items, show, source, visible, weight


def settings(row) -> None:
    member, limit = row.member, row.rules.max_num_inference_steps
    for name, parse in (
        (schema.PRIOR_NUM_INFERENCE_STEPS, as_int),
        (schema.PRIOR_GUIDANCE_SCALE, as_float),
    ):
        row.out[name] = None
        if not row.capabilities.prior:
            if row.raw.get(name) is not None:
                row.warnings.append(
                    f"{name}: ignored by {member.name} (no prior), got {show(row.raw.get(name))}"
                )
            continue

        def check(v, name=name):
            if name == schema.PRIOR_NUM_INFERENCE_STEPS:
                # diffusers' UnCLIPScheduler divides by (steps - 1).
                if not 2 <= v <= limit:
                    raise RowError(
                        f"{name}: must be in [2, limits.max_num_inference_steps={limit}], got {v}"
                    )
            elif not (math.isfinite(v) and v >= 0):
                raise RowError(f"{name}: must be finite and >= 0, got {v}")
            return v

        row.out[name] = row.field(name, parse, check)


def mix(row) -> None:
    value = row.raw.get(schema.MIX)
    if value is None:
        return
    if not row.capabilities.mix:
        mixers = row.capabilities.takers["mix"]
        row.errors.append(f"mix: only {mixers} mixes images and prompts, got {show(value)}")
        return
    for where, item in items(value, schema.MIX, "{prompt | image, weight}", row.errors):
        prompt, image = item.get(schema.MIX_PROMPT), item.get(schema.MIX_IMAGE)
        if (prompt is None) == (image is None):
            which = "both prompt and image" if prompt is not None else "neither prompt nor image"
            row.errors.append(f"{where}: {which}, give one, got {show(item)}")
        elif prompt is not None and not (isinstance(prompt, str) and visible(prompt)):
            row.errors.append(f"{where}.prompt: expected visible text, got {show(prompt)}")
        elif image is not None:
            source(item, schema.MIX_IMAGE, row.errors, where=f"{where}.image")
        weight(item.get(schema.MIX_WEIGHT), where, row.errors)
