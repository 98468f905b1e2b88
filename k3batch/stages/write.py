"""Encode images on CPU: write each as OUTPUT/images/<key>.<ext>, or keep the bytes for shards."""

from __future__ import annotations

import pyarrow as pa

from k3batch import storage
from k3batch.images import EXTENSIONS, encode_rgb
from k3batch.rows import STATUS_ERROR, STATUS_OK, object_key
from k3batch.stages.base import Stage


class _EncodeStage(Stage):
    needs = ("id", "image_rgb", "width", "height", "status", "error")
    drops = ("image_rgb",)

    def __init__(self, image_format: str = "png", quality: int = 95):
        self.image_format = image_format
        self.quality = quality
        self.ext = EXTENSIONS[image_format]

    def _encode(self, batch: dict[str, list], i: int) -> bytes:
        return encode_rgb(
            batch["image_rgb"][i],
            batch["width"][i],
            batch["height"][i],
            self.image_format,
            self.quality,
        )

    def _rows_to_encode(self, batch, out):
        """Indices of rows with an image; a row marked ok without one becomes an error."""
        for i in range(len(batch["id"])):
            if batch["status"][i] != STATUS_OK:
                continue
            if batch["image_rgb"][i] is None:
                out["status"][i] = STATUS_ERROR
                out["error"][i] = "generate: no image was produced"
                continue
            yield i


class WriteImagesStage(_EncodeStage):
    """`files` output: one object per image; `image_uri` is set only once it is fully written."""

    adds = {"image_uri": pa.string(), "status": pa.string(), "error": pa.string()}

    def __init__(
        self,
        output_uri: str,
        image_format: str = "png",
        quality: int = 95,
        storage_settings: storage.Settings | None = None,
    ):
        super().__init__(image_format, quality)
        self.images_uri = storage.join(output_uri, "images")
        self.fs, self.root = storage.filesystem(self.images_uri, storage_settings)
        self.fs.makedirs(self.root, exist_ok=True)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["id"])
        out = {
            "image_uri": [None] * n,
            "status": list(batch["status"]),
            "error": list(batch["error"]),
        }
        for i in self._rows_to_encode(batch, out):
            name = f"{object_key(batch['id'][i])}.{self.ext}"
            try:
                data = self._encode(batch, i)
            except Exception as e:  # noqa: BLE001 - a failed encode is that row's error
                out["status"][i] = STATUS_ERROR
                out["error"][i] = f"encode: {type(e).__name__}: {e}"
                continue
            try:
                # pipe_file returns once the object is complete (one PUT, or a completed
                # multipart upload), so a row is never `ok` with a partial image.
                self.fs.pipe_file(f"{self.root}/{name}", data)
            except Exception as e:
                # Not the row's fault (s3fs already retried): fail the batch, so the job stops
                # and a rerun writes these rows, instead of recording them as errors for good.
                raise storage.StorageError(
                    f"output.uri: cannot write {storage.join(self.images_uri, name)}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            out["image_uri"][i] = storage.join(self.images_uri, name)
        return out


class EncodeImagesStage(_EncodeStage):
    """`webdataset` output: encoded bytes and the sample key, for the shard writer."""

    adds = {
        "key": pa.string(),
        "image_bytes": pa.binary(),
        "image_uri": pa.string(),
        "status": pa.string(),
        "error": pa.string(),
    }

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["id"])
        out = {
            "key": [object_key(row_id, dots=False) for row_id in batch["id"]],
            "image_bytes": [None] * n,
            "image_uri": [None] * n,  # an image lives in a shard: see `key`
            "status": list(batch["status"]),
            "error": list(batch["error"]),
        }
        for i in self._rows_to_encode(batch, out):
            try:
                out["image_bytes"][i] = self._encode(batch, i)
            except Exception as e:  # noqa: BLE001 - a failed encode is that row's error
                out["status"][i] = STATUS_ERROR
                out["error"][i] = f"encode: {type(e).__name__}: {e}"
        return out
