"""`normalise_row`: a row's normalised generation fields plus `status`, `error` and `warning`,
from the checks of each concern in turn (their order is the order of a row's messages)."""

from __future__ import annotations

from k3batch import schema
from k3batch.rows import hints, image_prompts, images, prior, prompt, sampling, seeds
from k3batch.rows.row import RowCheck
from k3batch.schema import STATUS_ERROR, STATUS_OK

CHECKS = (
    prompt.prompt,
    prompt.negative_prompt,
    images.image_and_mask,
    images.size,
    sampling.ignored_settings,
    sampling.steps,
    sampling.guidance,
    sampling.scheduler,
    sampling.strength,
    prior.settings,
    hints.hint,
    prior.mix,
    hints.control_settings,
    image_prompts.image_prompts,
    seeds.images_and_seeds,
)


def normalise_row(raw: dict, prompt_column: str, rules) -> dict:
    """The row's normalised fields, `status` and `error` (each bad field named, with its
    value) and `warning` (settings the row gives that its member ignores).

    `raw` holds the input columns (override columns optional); `raw[schema.ID]` must already
    be the row's id (a string). `rules`: the job's `RowRules`.
    """
    row = RowCheck(raw, prompt_column, rules)
    for check in CHECKS:
        check(row)
    out = row.out
    out[schema.STATUS] = STATUS_ERROR if row.errors else STATUS_OK
    out[schema.ERROR] = "; ".join(row.errors) if row.errors else None
    out[schema.WARNING] = "; ".join(row.warnings) if row.warnings else None
    return out
