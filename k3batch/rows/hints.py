"""A row's `hint` image: a depth hint (every row of a depth member brings one, or an image it
is estimated from) or an edge hint (the Kandinsky 3 ControlNet: rows without one are plain),
and a hinted row's ControlNet settings: scale >= 0, 0 <= start < end <= 1."""

from __future__ import annotations

import math

from k3batch import schema
from k3batch.rows.values import RowError, as_float, show, source


def hint(row) -> None:
    raw, member, caps = row.raw, row.member, row.capabilities
    given = source(raw, schema.HINT, row.errors)
    if raw.get(schema.HINT) is not None and caps.hint is None:
        row.errors.append(
            f"hint: only {caps.takers['depth_hint']} takes a depth hint, or "
            f"{caps.takers['conditioning']} with model.controlnet an edge hint; "
            f"got {show(raw.get(schema.HINT))}"
        )
    elif caps.hint == "depth" and given is None and raw.get(schema.HINT) is None:
        if not row.has_image:
            row.errors.append(
                f"hint: missing (null), {member.name} needs a `hint` depth image, or an `image` "
                "to estimate it from"
            )
        elif not caps.hint_estimator:
            row.errors.append(
                f"hint: missing (null), and no model.depth_estimator to estimate it from "
                f"`image`; {member.name} needs one of them"
            )


def control_settings(row) -> None:
    """Recorded only on rows the ControlNet conditions: a plain row's record shows no scale;
    a setting on a row without a hint, or a job without model.controlnet, is ignored with a
    warning."""
    names = schema.CONTROLNET_COLUMNS
    hinted = row.raw.get(schema.HINT) is not None
    on = row.capabilities.control_settings
    if not (on and hinted):
        why = "without model.controlnet" if not on else "the row has no hint"
        for name in names:
            row.out[name] = None
            if row.raw.get(name) is not None:
                row.warnings.append(f"{name}: ignored, {why}, got {show(row.raw.get(name))}")
        return

    def unit(name):
        def check(v):
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise RowError(f"{name}: must be in [0, 1], got {v}")
            return v

        return check

    def scale_check(v):
        if not (math.isfinite(v) and v >= 0):
            raise RowError(
                f"{schema.CONTROLNET_CONDITIONING_SCALE}: must be finite and >= 0, got {v}"
            )
        return v

    scale, start, end = names
    out = row.out
    out[scale] = row.field(scale, as_float, scale_check)
    out[start] = row.field(start, as_float, unit(start))
    out[end] = row.field(end, as_float, unit(end))
    if out[start] is not None and out[end] is not None and not out[start] < out[end]:
        row.errors.append(f"{start}: must be < {end} ({out[end]}), got {out[start]}")
        out[start] = None
