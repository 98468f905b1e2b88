"""A request's rows, as a batch row's: its fields and base64 images in the row's columns,
normalised and checked by the batch job's row rules, which read the served member's declared
capabilities: a failing row, or a setting the member does not take (a batch row's warning), is
a 400 naming its field."""

import uuid

from k3batch import schema
from k3batch.rows.check import normalise_row
from k3batch.serve.protocol import row_error
from k3batch.serve.uploads import b64_image


def generation_images(req, max_side: int) -> dict:
    """The request's base64 images (`hint`, `ip_images[j].image`) as bytes, in the row's
    columns; the row rules and the prepare stage then check them as a batch row's (off
    the event loop: decoding)."""
    extra = {}
    if req.hint is not None:
        extra[schema.HINT] = b64_image(schema.HINT, req.hint, max_side)
    if req.ip_images is not None:
        extra[schema.IP_IMAGES] = [
            {
                schema.IP_IMAGE: b64_image(f"{schema.IP_IMAGES}[{j}].image", p.image, max_side),
                schema.IP_WEIGHT: p.weight,
            }
            for j, p in enumerate(req.ip_images)
        ]
    return extra


def request_row(req, prompt: str, width, height, i: int, rules, extra=None) -> dict:
    raw = {
        schema.ID: uuid.uuid4().hex,
        schema.PROMPT: prompt,
        schema.NEGATIVE_PROMPT: req.negative_prompt,
        # n images of one request: seed, seed+1, ... so each is reproducible on its own.
        schema.SEED: None if req.seed is None else req.seed + i,
        schema.WIDTH: width,
        schema.HEIGHT: height,
        schema.NUM_INFERENCE_STEPS: req.num_inference_steps,
        schema.GUIDANCE_SCALE: req.guidance_scale,
        schema.SCHEDULER: getattr(req, "scheduler", None),
        schema.PRIOR_NUM_INFERENCE_STEPS: req.prior_num_inference_steps,
        schema.PRIOR_GUIDANCE_SCALE: req.prior_guidance_scale,
        # Generations only (the ControlNet's and IP-Adapter's settings; null elsewhere).
        **{c: getattr(req, c, None) for c in (*schema.CONTROLNET_COLUMNS, schema.IP_ADAPTER_SCALE)},
        **(extra or {}),
    }
    row = normalise_row(raw, schema.PROMPT, rules)
    if row[schema.STATUS] != schema.STATUS_OK:
        raise row_error(row[schema.ERROR])
    if row[schema.WARNING]:
        # A setting the served member does not take: a batch row runs with a warning, a
        # request that names it is answered 400 rather than silently generated without it.
        raise row_error(row[schema.WARNING].split("; ")[0])
    return row
