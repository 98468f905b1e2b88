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


# ---------------------------------------------------------------- input images and masks
# Inputs of image-to-image and inpainting rows: read through fsspec or given as raw bytes,
# then sized as the reference's `resize_image_for_diffusion` / `resize_mask_for_diffusion`
# (kandinsky3/utils.py) do: above one megapixel scale down to about one megapixel, then
# floor each side to a multiple of 64 (the aspect ratio is kept up to that flooring).

MASK_THRESHOLD = 128  # mask images: grey level >= 128 (white) = repaint


def read_bytes(value, storage_settings: dict | None = None) -> bytes:
    """The bytes of a URI (any fsspec protocol, or a local path) or of raw bytes.
    `storage_settings`: the config's `storage` section (an S3 endpoint, profile, retries)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    from k3batch import storage

    fs, path = storage.filesystem(value, storage_settings)
    return fs.cat_file(path)


def open_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def diffusion_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) the reference gives an input of this size."""
    reduce = max(1.0, (width * height / 1024**2) ** 0.5)
    return (round(width / reduce) // 64) * 64, (round(height / reduce) // 64) * 64


def prepare_image(image, size: tuple[int, int]):
    """RGB uint8 HxWx3 at `size`, resized by Pillow's default filter as the reference does."""
    import numpy as np

    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size)  # no filter given, like the reference (bicubic for RGB)
    return np.asarray(image, dtype=np.uint8)


def mask_array(image):
    """A mask image as the reference's mask array: 1.0 = repaint, 0.0 = keep."""
    import numpy as np

    grey = np.asarray(image.convert("L"))
    return (grey >= MASK_THRESHOLD).astype(np.float64)


def prepare_mask(mask, size: tuple[int, int]):
    """The keep-mask (float32, 1 = keep) at `size` from a repaint mask (1 = repaint).

    skimage's `resize(mask, (h, w), preserve_range=True, anti_aliasing=False)` in the
    reference is `scipy.ndimage.zoom(order=1, mode='mirror', grid_mode=True)` clipped to the
    input's range; then `1 - mask` in float64, cast to float32, as the reference's
    `1 - ToTensor()(mask)` then `.type(float32)`.
    """
    import numpy as np

    width, height = size
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != (height, width):
        from scipy import ndimage

        zoom = (height / mask.shape[0], width / mask.shape[1])
        resized = ndimage.zoom(mask, zoom, order=1, mode="mirror", grid_mode=True)
        mask = np.clip(resized, mask.min(), mask.max())
    return (1.0 - mask).astype(np.float32)
