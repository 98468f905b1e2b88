"""A row's input image and mask (what the member takes: none, an optional image, or image and
mask), and its size: positive multiples of 64 within `limits.max_side`, following the image
when the row has one (checked against it once it is read, in the image-preparing stage)."""

from __future__ import annotations

from k3batch import schema
from k3batch.rows.values import RowError, as_int, show, source
from k3batch.schema import IMAGE_COLUMNS


def image_and_mask(row) -> None:
    raw, member = row.raw, row.member
    image = source(raw, schema.IMAGE, row.errors)
    source(raw, schema.MASK, row.errors)
    if not member.takes_image:
        for name in IMAGE_COLUMNS:
            if raw.get(name) is not None:
                row.errors.append(
                    f"{name}: {member.name} is text-to-image only, got {show(raw.get(name))}"
                )
    elif member.needs_mask:
        for name in IMAGE_COLUMNS:
            if raw.get(name) is None:
                row.errors.append(f"{name}: missing (null), {member.name} needs image and mask")
    elif raw.get(schema.MASK) is not None:
        # The mask-taking member of this row's own family (Kandinsky 3 or 2.2).
        masked = row.capabilities.takers["mask"]
        row.errors.append(f"mask: only {masked} takes a mask, got {show(raw.get('mask'))}")
    row.has_image = image is not None and member.takes_image


def size(row) -> None:
    max_side = row.rules.max_side

    def side(name):
        def check(v):
            if v <= 0 or v % 64:
                raise RowError(f"{name}: must be a positive multiple of 64, got {v}")
            if v > max_side:
                raise RowError(f"{name}: {v} is above limits.max_side={max_side}")
            return v

        return check

    for name in (schema.WIDTH, schema.HEIGHT):
        # An image row's size follows its image (the reference's resize) unless it gives one.
        if row.has_image and row.raw.get(name) is None:
            row.out[name] = None
        else:
            row.out[name] = row.field(name, as_int, side(name))
