"""Encode images on CPU: write each as OUTPUT/images/<key>.<ext>, or keep the bytes for shards."""

from __future__ import annotations

from k3batch import schema, storage
from k3batch.images import EXTENSIONS, encode_rgb
from k3batch.rows.records import record_key
from k3batch.stages.base import Stage, fail_row, ok_rows, start_output


class _EncodeStage(Stage):
    needs = (schema.ID, schema.IMAGE_RGB, schema.WIDTH, schema.HEIGHT, *schema.STATUS_COLUMNS)
    optional = (schema.K, schema.SOURCE_IMAGE_RGB, schema.SOURCE_WIDTH, schema.SOURCE_HEIGHT)
    drops = (schema.IMAGE_RGB, schema.SOURCE_IMAGE_RGB)
    # Added with `keep_source`: where the image before upscaling went.
    source_adds: dict = {}

    def __init__(
        self,
        image_format: str = "png",
        quality: int = 95,
        several_images: bool = False,
        keep_source: bool = False,
    ):
        """`several_images`: the job may give a row several images (`rows.several_images`),
        so keys carry each record's `k`. `keep_source`: records also carry their image
        before upscaling (`upscale.keep_source`), encoded beside the image."""
        self.image_format = image_format
        self.quality = quality
        self.ext = EXTENSIONS[image_format]
        self.several_images = several_images
        self.keep_source = keep_source
        if keep_source:
            self.adds = self.adds | self.source_adds

    def _key(self, batch: dict[str, list], i: int, dots: bool = True) -> str:
        k = batch[schema.K][i] if schema.K in batch else 0
        return record_key(batch[schema.ID][i], k, self.several_images, dots=dots)

    def _encode(self, batch: dict[str, list], i: int) -> bytes:
        return encode_rgb(
            batch[schema.IMAGE_RGB][i],
            batch[schema.WIDTH][i],
            batch[schema.HEIGHT][i],
            self.image_format,
            self.quality,
        )

    def _encode_source(self, batch: dict[str, list], i: int) -> bytes | None:
        """The image before upscaling, encoded; None when the record has none."""
        raw = batch.get(schema.SOURCE_IMAGE_RGB, [None] * (i + 1))[i]
        if not self.keep_source or raw is None:
            return None
        w, h = batch[schema.SOURCE_WIDTH][i], batch[schema.SOURCE_HEIGHT][i]
        return encode_rgb(raw, w, h, self.image_format, self.quality)

    def _rows_to_encode(self, batch, out):
        """Indices of rows with an image; a row marked ok without one becomes an error."""
        for i in ok_rows(batch):
            if batch[schema.IMAGE_RGB][i] is None:
                fail_row(out, i, "generate", "no image was produced")
                continue
            yield i


class WriteImagesStage(_EncodeStage):
    """`files` output: one object per image; `image_uri` is set only once it is fully written."""

    adds = schema.types(schema.IMAGE_URI, *schema.STATUS_COLUMNS)
    source_adds = schema.types(schema.SOURCE_IMAGE_URI)

    def __init__(
        self,
        output_uri: str,
        image_format: str = "png",
        quality: int = 95,
        storage_settings: storage.Settings | None = None,
        several_images: bool = False,
        keep_source: bool = False,
    ):
        super().__init__(image_format, quality, several_images, keep_source)
        self.images_uri = storage.join(output_uri, "images")
        self.fs, self.root = storage.filesystem(self.images_uri, storage_settings)
        self.fs.makedirs(self.root, exist_ok=True)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = start_output(batch, self.adds)
        for i in self._rows_to_encode(batch, out):
            key = self._key(batch, i)
            try:
                data = self._encode(batch, i)
                source = self._encode_source(batch, i)
            except Exception as e:  # noqa: BLE001 - a failed encode is that row's error
                fail_row(out, i, "encode", e)
                continue
            if source is not None:
                # Before the image: a record whose image_uri is set has both files.
                name = f"{key}.source.{self.ext}"
                out[schema.SOURCE_IMAGE_URI][i] = self._put(name, source)
            out[schema.IMAGE_URI][i] = self._put(f"{key}.{self.ext}", data)
        return out

    def _put(self, name: str, data: bytes) -> str:
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
        return storage.join(self.images_uri, name)


class EncodeImagesStage(_EncodeStage):
    """`webdataset` output: encoded bytes and the sample key, for the shard writer."""

    adds = schema.types(schema.KEY, schema.IMAGE_BYTES, schema.IMAGE_URI, *schema.STATUS_COLUMNS)
    source_adds = schema.types(schema.SOURCE_IMAGE_BYTES)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = start_output(batch, self.adds)  # no image_uri: an image lives in a shard, see key
        out[schema.KEY] = [self._key(batch, i, dots=False) for i in range(len(batch[schema.ID]))]
        for i in self._rows_to_encode(batch, out):
            try:
                out[schema.IMAGE_BYTES][i] = self._encode(batch, i)
                if self.keep_source:
                    out[schema.SOURCE_IMAGE_BYTES][i] = self._encode_source(batch, i)
            except Exception as e:  # noqa: BLE001 - a failed encode is that row's error
                fail_row(out, i, "encode", e)
        return out
