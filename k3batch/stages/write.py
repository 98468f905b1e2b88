"""Encode images on CPU and write them as OUTPUT/images/<key>.<ext>."""

from __future__ import annotations

import pyarrow as pa

from k3batch import storage
from k3batch.images import EXTENSIONS, encode_rgb
from k3batch.rows import STATUS_ERROR, STATUS_OK, object_key
from k3batch.stages.base import Stage


class WriteImagesStage(Stage):
    needs = ("id", "image_rgb", "width", "height", "status", "error")
    adds = {"image_uri": pa.string(), "status": pa.string(), "error": pa.string()}
    drops = ("image_rgb",)

    def __init__(self, output_uri: str, image_format: str = "png", quality: int = 95):
        self.images_uri = storage.join(output_uri, "images")
        self.fs, self.root = storage.filesystem(self.images_uri)
        self.fs.makedirs(self.root, exist_ok=True)
        self.image_format = image_format
        self.quality = quality
        self.ext = EXTENSIONS[image_format]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["id"])
        out = {
            "image_uri": [None] * n,
            "status": list(batch["status"]),
            "error": list(batch["error"]),
        }
        for i in range(n):
            if batch["status"][i] != STATUS_OK:
                continue
            if batch["image_rgb"][i] is None:
                out["status"][i] = STATUS_ERROR
                out["error"][i] = "generate: no image was produced"
                continue
            name = f"{object_key(batch['id'][i])}.{self.ext}"
            try:
                data = encode_rgb(
                    batch["image_rgb"][i],
                    batch["width"][i],
                    batch["height"][i],
                    self.image_format,
                    self.quality,
                )
                self.fs.pipe_file(f"{self.root}/{name}", data)
            except Exception as e:  # noqa: BLE001 - a failed write is that row's error
                out["status"][i] = STATUS_ERROR
                out["error"][i] = f"write: {type(e).__name__}: {e}"
                continue
            out["image_uri"][i] = storage.join(self.images_uri, name)
        return out
