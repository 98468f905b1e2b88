"""Request images: the multipart body of `/v1/images/edits`, `/variations` and `/upscale`,
its image (and mask) files and the OpenAI mask rule; base64 image fields of JSON bodies
(`hint`); and the images prepared as the batch job prepares them."""

import base64
import io
from collections import defaultdict
from typing import Any

from fastapi import Request

from k3batch import schema
from k3batch.rows.values import show
from k3batch.serve.protocol import ApiError, row_error


async def read_form(request: Request, limit: int) -> tuple[dict, dict]:
    """A multipart body as (text fields, uploaded files' bytes), size-bounded."""
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(
            400,
            f"{request.url.path} takes multipart/form-data (an image file and form fields)",
        )
    try:
        form = await request.form(max_files=4, max_fields=32, max_part_size=limit)
    except Exception as e:  # noqa: BLE001 - any malformed multipart body is a client error
        raise ApiError(400, f"malformed multipart body: {e}") from None
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = defaultdict(list)
    size = 0
    for key, value in form.multi_items():
        if hasattr(value, "read"):  # an upload
            data = await value.read()
            size += len(data)
            files[key.removesuffix("[]")].append(data)
        else:
            fields[key] = value
    if size > limit:
        raise ApiError(413, f"uploaded files are larger than {limit} bytes")
    return fields, files


def _one_file(files: dict, name: str, required: bool) -> bytes | None:
    found = files.get(name, [])
    if len(found) > 1:
        raise ApiError(400, f"{name}: one file expected, got {len(found)}", param=name)
    if not found:
        if required:
            raise ApiError(400, f"{name}: missing (upload it as a file)", param=name)
        return None
    if not found[0]:
        raise ApiError(400, f"{name}: empty file", param=name)
    return found[0]


def _open_upload(name: str, data: bytes):
    from k3batch.images import open_image

    try:
        return open_image(data)
    except Exception as e:  # noqa: BLE001 - undecodable uploads are the client's error
        raise ApiError(
            400, f"{name}: not a readable image ({len(data)} bytes): {type(e).__name__}", param=name
        ) from None


def b64_image(name: str, value: str, max_side: int) -> bytes:
    """The image bytes of a JSON body's base64 image field: plain base64 (whitespace and line
    breaks allowed) or a `data:<type>;base64,` URL, holding an image Pillow reads (PNG, JPEG,
    WebP, ...) of at most `max_side` pixels a side. Anything else is a 400 naming `name`
    (`hint`, `ip_images[0].image`). Only the header is read here; the batch job's prepare
    stage decodes the image."""
    from PIL import Image

    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(
                400,
                f"{name}: a data: URL must be base64 (data:image/png;base64,...), got "
                f"{show(header)}",
                param=name,
            )
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except ValueError as e:  # binascii.Error, or non-ASCII text
        raise ApiError(400, f"{name}: not valid base64: {e}", param=name) from None
    if not data:
        raise ApiError(400, f"{name}: empty (a base64-encoded image expected)", param=name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as e:  # noqa: BLE001 - undecodable data is the client's error
        raise ApiError(
            400, f"{name}: not a readable image ({len(data)} bytes): {type(e).__name__}", param=name
        ) from None
    if max(width, height) > max_side:
        raise ApiError(
            400, f"{name}: {width}x{height} is above limits.max_side={max_side}", param=name
        )
    return data


def repaint_mask(mask) -> Any:
    """The repaint area of an edits mask as a k3batch mask image (white = repaint).

    OpenAI's rule: the fully transparent pixels (alpha 0) of the mask (or, without a mask,
    of the image) are edited. A mask without an alpha channel is read as k3batch's batch
    masks are: white (grey >= 128) = repaint.
    """
    import numpy as np
    from PIL import Image

    from k3batch.images import MASK_THRESHOLD

    if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        repaint = alpha == 0
    else:
        repaint = np.asarray(mask.convert("L")) >= MASK_THRESHOLD
    return Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8), mode="L")


def edit_inputs(files: dict) -> tuple[bytes, bytes]:
    """(image PNG, mask PNG) as k3batch's rows take them, from the uploaded files."""
    # The form's file fields (OpenAI's names), not row columns.
    unknown = sorted(set(files) - {"image", "mask"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unexpected file field", param=unknown[0])
    image_bytes = _one_file(files, "image", required=True)
    mask_bytes = _one_file(files, "mask", required=False)
    image = _open_upload("image", image_bytes)
    if mask_bytes is None:
        if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
            raise ApiError(
                400,
                "mask: missing, and the image has no transparent pixels to edit; upload a "
                "mask (transparent or white = repaint) or an image with an alpha channel",
                param="mask",
            )
        mask = image
    else:
        mask = _open_upload("mask", mask_bytes)
    buf = io.BytesIO()
    repaint_mask(mask).save(buf, format="PNG")
    return image_bytes, buf.getvalue()


def upscale_input(files: dict):
    """The uploaded image of /v1/images/upscale as an HxWx3 uint8 array."""
    import numpy as np

    unknown = sorted(set(files) - {"image"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unexpected file field", param=unknown[0])
    image = _open_upload("image", _one_file(files, "image", required=True))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def variation_input(files: dict) -> bytes:
    """The uploaded image of /v1/images/variations, checked readable."""
    unknown = sorted(set(files) - {"image"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unexpected file field", param=unknown[0])
    data = _one_file(files, "image", required=True)
    _open_upload("image", data)
    return data


# What a prepared edit adds to each of its rows.
PREPARED_COLUMNS = (schema.WIDTH, schema.HEIGHT, schema.SOURCE_RGB, schema.KEEP_MASK)


def _prepared(job: dict, inputs: dict, param: str | None = None, **stage) -> dict:
    """One row's `inputs` (image, mask, hint, mix) through the batch job's prepare stage
    (`stage`: its arguments) at the row's size: its output row. A failure is a 400 naming
    `param`, or the field the stage names."""
    from k3batch.stages.prepare import PrepareImagesStage

    batch = {
        c: [job[c]] for c in (schema.ID, schema.WIDTH, schema.HEIGHT, schema.STATUS, schema.ERROR)
    }
    batch.update({name: [value] for name, value in inputs.items()})
    out = PrepareImagesStage(**stage)(batch)
    if out[schema.STATUS][0] != schema.STATUS_OK:
        error = out[schema.ERROR][0]
        raise row_error(error) if param is None else ApiError(400, error, param=param)
    return {c: values[0] for c, values in out.items()}


def prepare_images(job: dict, image: bytes, mask: bytes) -> dict:
    """The image and mask read and sized exactly as the batch job's prepare stage does."""
    out = _prepared(job, {schema.IMAGE: image, schema.MASK: mask})
    return {c: out[c] for c in PREPARED_COLUMNS}


def prepare_mix(job: dict, capabilities) -> list:
    """A variation row's `mix` (the uploaded image, weight 1) prepared as the batch job's
    prepare stage prepares a mix; its failure is a 400 naming `image` (the upload).
    `capabilities`: the served model's (`k3batch.model.family.row_capabilities`)."""
    out = _prepared(job, {schema.MIX: job[schema.MIX]}, param="image", capabilities=capabilities)
    return out[schema.MIX_PREPARED]


def prepare_ip_images(job: dict, items: list[dict], capabilities) -> list[dict]:
    """A Kandinsky 3 IP-Adapter row's `ip_images` read as the batch job's prepare stage reads
    them (its `ip_images_prepared`); a failure is a 400 naming `ip_images[j].image`."""
    out = _prepared(job, {schema.IP_IMAGES: items}, capabilities=capabilities)
    return out[schema.IP_IMAGES_PREPARED]


def prepare_hint(job: dict, hint: bytes, capabilities) -> bytes:
    """A hinted row's `hint` read and resized to the row's size as the batch job's prepare
    stage does (its `hint_rgb`); its failure is a 400 naming `hint`."""
    return _prepared(job, {schema.HINT: hint}, capabilities=capabilities)[schema.HINT_RGB]
