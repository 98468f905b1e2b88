"""A row's image prompts (`ip_images`: a non-empty list of {image, weight}) and the adapter's
scale (finite, >= 0; recorded only on rows with images). Without the IP-Adapter, images are an
error and a scale is ignored with a warning."""

from __future__ import annotations

import math

from k3batch import schema
from k3batch.rows.values import RowError, as_float, items, show, source, weight


def image_prompts(row) -> None:
    given = row.raw.get(schema.IP_IMAGES)
    scale = row.raw.get(schema.IP_ADAPTER_SCALE)
    row.out[schema.IP_ADAPTER_SCALE] = None
    if not row.capabilities.ip_images:
        if given is not None:
            row.errors.append(
                f"{schema.IP_IMAGES}: image prompts need model.ip_adapter "
                f"({row.capabilities.takers['conditioning']} with the IP-Adapter), "
                f"got {show(given)}"
            )
        if scale is not None:
            row.warnings.append(
                f"{schema.IP_ADAPTER_SCALE}: ignored without model.ip_adapter, got {show(scale)}"
            )
        return
    if given is None:
        if scale is not None:
            row.warnings.append(
                f"{schema.IP_ADAPTER_SCALE}: ignored, the row has no {schema.IP_IMAGES}, got "
                f"{show(scale)}"
            )
        return
    for where, item in items(given, schema.IP_IMAGES, "{image, weight}", row.errors):
        if item.get(schema.IP_IMAGE) is None:
            row.errors.append(f"{where}.image: missing (null), got {show(item)}")
        else:
            source(item, schema.IP_IMAGE, row.errors, where=f"{where}.image")
        # A missing weight is 1.0, as the fork weighs a single image.
        weight(item.get(schema.IP_WEIGHT), where, row.errors, optional=True)

    def check(v):
        if not (math.isfinite(v) and v >= 0):
            raise RowError(f"{schema.IP_ADAPTER_SCALE}: must be finite and >= 0, got {v}")
        return v

    row.out[schema.IP_ADAPTER_SCALE] = row.field(schema.IP_ADAPTER_SCALE, as_float, check)
