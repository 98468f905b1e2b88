"""Read the input images and masks of image-to-image and inpainting rows, on CPU tasks.

Each `image`/`mask` is a URI (any fsspec protocol or a local path) or raw bytes. The image is
sized as the reference does (about one megapixel at most, sides floored to multiples of 64)
and handed on as raw RGB; the mask becomes the reference's keep-mask at the same size.
Kandinsky 2.2: a `hint` (depth image) is read the same way and resized to the row's size; the
images of a `mix` are read at their own size, up to `limits.max_side` (the prior's CLIP image
processor resizes them, as in diffusers' `interpolate`). Kandinsky 3: the ControlNet's `hint`
as 2.2's; the IP-Adapter's `ip_images` as a mix's images (its CLIP processor resizes them).
Anything that goes wrong is that row's error, naming the field and the value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from k3batch import images, schema
from k3batch.rows.values import show
from k3batch.stages.base import Stage, fail_row, ok_rows, start_output

if TYPE_CHECKING:
    from k3batch.rows.capabilities import RowCapabilities


def describe(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return show(value)


class RowFailure(Exception):
    """The row's own failure, naming the input field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PrepareImagesStage(Stage):
    needs = (schema.ID, schema.WIDTH, schema.HEIGHT, *schema.STATUS_COLUMNS)
    optional = (*schema.IMAGE_COLUMNS, *schema.K22_INPUT_COLUMNS, schema.IP_IMAGES)
    adds = schema.types(
        schema.SOURCE_RGB, schema.KEEP_MASK, schema.WIDTH, schema.HEIGHT, *schema.STATUS_COLUMNS
    )

    def __init__(
        self,
        max_side: int = 2048,
        base_dir: str | None = None,
        storage_settings: dict | None = None,
        capabilities: RowCapabilities | None = None,
    ):
        """`capabilities`: what the job's rows may bring (`k3batch.model.family.row_capabilities`):
        a `hint` (depth or edge), `mix` items, `ip_images`; None: an image and a mask only."""
        self.max_side = max_side
        caps = capabilities
        self.hints = caps is not None and caps.hint is not None
        self.mixes = caps is not None and caps.mix
        self.ip_images = caps is not None and caps.ip_images
        if caps is not None:
            self.adds = self.adds | schema.types(*caps.prepared_columns())
        # The job's `storage` section: input images on an S3-compatible store are read
        # through the same endpoint and credentials as the prompts.
        self.storage_settings = storage_settings
        # Relative local paths in the table are relative to where the job was started (as in
        # the config); Ray workers may run elsewhere.
        self.base_dir = base_dir

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch[schema.ID])
        # The size of an image row follows its image; other rows keep theirs.
        out = start_output(batch, self.adds, carry=(schema.WIDTH, schema.HEIGHT))
        sources = batch.get(schema.IMAGE) or [None] * n
        masks = batch.get(schema.MASK) or [None] * n
        hints = (self.hints and batch.get(schema.HINT)) or [None] * n
        mixes = (self.mixes and batch.get(schema.MIX)) or [None] * n
        prompts = (self.ip_images and batch.get(schema.IP_IMAGES)) or [None] * n
        for i in ok_rows(batch):
            try:
                if sources[i] is not None:
                    self._prepare(i, sources[i], masks[i], batch, out)
                if hints[i] is not None:
                    out[schema.HINT_RGB][i] = self._hint(hints[i], out, i)
                if mixes[i] is not None:
                    out[schema.MIX_PREPARED][i] = self._mix(mixes[i])
                if prompts[i] is not None:
                    out[schema.IP_IMAGES_PREPARED][i] = self._ip_images(prompts[i])
            except RowFailure as e:
                fail_row(out, i, e.field, e.message)
        return out

    def _hint(self, value, out, i) -> bytes:
        hint = self.open_image(schema.HINT, value)
        size = (out[schema.WIDTH][i], out[schema.HEIGHT][i])
        return images.prepare_image(hint, size).tobytes()

    def _mix(self, items) -> list[dict]:
        prepared = []
        for j, item in enumerate(items):
            entry = {"prompt": item.get(schema.MIX_PROMPT), "rgb": None, "width": None}
            entry |= {"height": None, "weight": float(item[schema.MIX_WEIGHT])}
            if item.get(schema.MIX_IMAGE) is not None:
                entry |= self._clip_input(f"mix[{j}].image", item[schema.MIX_IMAGE])
            prepared.append(entry)
        return prepared

    def _ip_images(self, items) -> list[dict]:
        prepared = []
        for j, item in enumerate(items):
            weight = item.get(schema.IP_WEIGHT)
            entry = self._clip_input(f"{schema.IP_IMAGES}[{j}].image", item[schema.IP_IMAGE])
            prepared.append(entry | {"weight": 1.0 if weight is None else float(weight)})
        return prepared

    def _clip_input(self, field: str, value) -> dict:
        """An image a CLIP image encoder will see: raw RGB at its own size (the encoder's
        processor resizes it), carried to the generation actor, so bounded like `image`."""
        image = self.open_image(field, value)
        if max(image.size) > self.max_side:
            w, h = image.size
            raise RowFailure(field, f"{w}x{h} is above limits.max_side={self.max_side}")
        image = image.convert("RGB")
        rgb = np.asarray(image, dtype=np.uint8).tobytes()
        return {"rgb": rgb, "width": image.size[0], "height": image.size[1]}

    def open_image(self, field: str, value):
        """The PIL image `value` (a URI, a path under `base_dir`, or bytes) holds; a
        `RowFailure` naming `field` when it cannot be read or decoded."""
        try:
            data = images.read_bytes(self._resolve(value), self.storage_settings)
        except Exception as e:  # noqa: BLE001 - any storage failure is the row's error
            raise RowFailure(
                field, f"cannot read {describe(value)}: {type(e).__name__}: {e}"
            ) from None
        try:
            return images.open_image(data)
        except Exception as e:  # noqa: BLE001 - undecodable data is the row's error
            raise RowFailure(
                field, f"not a readable image: {describe(value)}: {type(e).__name__}: {e}"
            ) from None

    def _resolve(self, value):
        import os

        from k3batch.storage import is_remote

        if isinstance(value, str) and self.base_dir and not is_remote(value):
            path = value.removeprefix("file://")
            return path if os.path.isabs(path) else os.path.join(self.base_dir, path)
        return value

    def _prepare(self, i, source, mask_source, batch, out) -> None:
        image = self.open_image(schema.IMAGE, source)
        w0, h0 = image.size
        width, height = images.diffusion_size(w0, h0)
        if min(width, height) < 64:
            raise RowFailure(
                schema.IMAGE,
                f"{w0}x{h0} is too small: each side must be at least 64 pixels "
                f"(got {width}x{height} after the reference's resize)",
            )
        if max(width, height) > self.max_side:
            raise RowFailure(
                schema.IMAGE,
                f"{w0}x{h0} gives {width}x{height}, above limits.max_side={self.max_side}",
            )
        for name, derived in ((schema.WIDTH, width), (schema.HEIGHT, height)):
            asked = batch[name][i]
            if asked is not None and asked != derived:
                raise RowFailure(
                    name,
                    f"{asked} differs from the size derived from the image "
                    f"({w0}x{h0} -> {width}x{height}), leave width/height empty for image rows",
                )
        if mask_source is not None:
            mask_image = self.open_image(schema.MASK, mask_source)
            if mask_image.size != image.size:
                raise RowFailure(
                    schema.MASK,
                    f"size {mask_image.size[0]}x{mask_image.size[1]} differs from the "
                    f"image's {w0}x{h0} ({describe(mask_source)})",
                )
            repaint = images.mask_array(mask_image)
            if not repaint.any():
                raise RowFailure(
                    schema.MASK,
                    f"empty, no pixel to repaint (white, grey >= {images.MASK_THRESHOLD}, "
                    f"= repaint): {describe(mask_source)}",
                )
            keep = images.prepare_mask(repaint, (width, height))
            out[schema.KEEP_MASK][i] = np.ascontiguousarray(keep).tobytes()
        out[schema.SOURCE_RGB][i] = images.prepare_image(image, (width, height)).tobytes()
        out[schema.WIDTH][i], out[schema.HEIGHT][i] = width, height
