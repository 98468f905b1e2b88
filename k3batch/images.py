"""Image encoding (PNG/JPEG/WebP) with Pillow."""

from __future__ import annotations

import io

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_rgb(raw: bytes, width: int, height: int, image_format: str, quality: int = 95) -> bytes:
    from PIL import Image

    image = Image.frombytes("RGB", (width, height), raw)
    buf = io.BytesIO()
    if image_format == "png":
        # Level 1: several times faster than Pillow's default 6 for ~10% larger files;
        # encoding must keep up with the GPU.
        image.save(buf, format="PNG", compress_level=1)
    elif image_format == "jpeg":
        image.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"image_format must be png, jpeg or webp, got {image_format!r}")
    return buf.getvalue()
