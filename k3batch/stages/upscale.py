"""Upscaling with KandiSuperRes: the rows of an image table (`job: upscale`), and the stage
that upscales each record's image, after generation or in that job."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import pyarrow as pa

from k3batch import schema
from k3batch.rows.records import record_hashes
from k3batch.rows.rules import RowRules
from k3batch.rows.seeds import row_seed
from k3batch.rows.values import RowError
from k3batch.stages.base import Stage, fail_row, ok_rows, start_output
from k3batch.stages.prepare import PrepareImagesStage, RowFailure, describe
from k3batch.stages.validate import ValidateStage

if TYPE_CHECKING:
    from k3batch.config.upscale import UpscaleConfig

log = logging.getLogger(__name__)


def too_large(width: int, height: int, scale: int, max_output_side: int) -> str | None:
    """Why an image of this size cannot be upscaled within `upscale.max_output_side`, or None."""
    if max(width, height) * scale <= max_output_side:
        return None
    return (
        f"{width}x{height} upscaled x{scale} would be {width * scale}x{height * scale}, above "
        f"upscale.max_output_side={max_output_side}"
    )


class UpscaleRowsStage(Stage):
    """`job: upscale`'s rows: the id as a generation job derives it, the seed, and the image
    read from `input.image_column` as raw RGB at its own size (a record: `k` = 0). A row
    without a readable image, or one too large to upscale, is an error naming the column."""

    adds = schema.types(
        schema.ID,
        schema.SEED,
        schema.IMAGE_RGB,
        schema.WIDTH,
        schema.HEIGHT,
        schema.K,
        schema.RECORD_HASH,
        schema.STATUS,
        schema.ERROR,
    )

    def __init__(
        self,
        image_column: str = schema.IMAGE,
        id_column: str = schema.ID,
        seed: int = 0,
        scale: int = 4,
        max_output_side: int = 4096,
        base_dir: str | None = None,
        storage_settings: dict | None = None,
        duplicate_ids: dict[str, int] | None = None,
    ):
        # Ids, and input columns named like k3batch's outputs kept as `input_<name>`, exactly
        # as a generation job's validation does them (an earlier job's metadata is a natural
        # input: its `image_uri` is read as `input_image_uri`).
        self.ids = ValidateStage(RowRules(), image_column, id_column, duplicate_ids)
        self.field = image_column
        renamed = image_column in schema.OUTPUT_ONLY_COLUMNS
        self.image_column = f"input_{image_column}" if renamed else image_column
        self.needs = (self.image_column,)
        self.optional = (id_column, schema.ROW_HASH, schema.SEED)
        self.seed = seed
        self.scale = scale
        self.max_output_side = max_output_side
        self.reader = PrepareImagesStage(base_dir=base_dir, storage_settings=storage_settings)

    def prepare(self, table: pa.Table) -> pa.Table:
        return self.ids.prepare(table)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        import numpy as np

        n = len(batch[self.image_column])
        out: dict[str, list] = {name: [None] * n for name in self.adds}
        hashes = batch.get(schema.ROW_HASH)
        if hashes is not None:  # each row is its image k = 0
            records = record_hashes(np.array(hashes, np.uint64), np.zeros(n, np.int64))
            out[schema.RECORD_HASH] = records.tolist()
        seeds = batch.get(schema.SEED) or [None] * n
        for i in range(n):
            row_id, error = self.ids.row_id(batch, i)
            out[schema.ID][i], out[schema.K][i] = row_id, 0
            out[schema.STATUS][i], out[schema.ERROR][i] = schema.STATUS_OK, None
            errors = [error] if error else []
            try:
                out[schema.SEED][i] = row_seed(seeds[i], self.seed, row_id)
            except RowError as e:
                errors.append(str(e))
            value = batch[self.image_column][i]
            if value is None:
                errors.append(f"{self.field}: missing (null), expected an image URI or bytes")
            elif not errors:
                try:
                    self._read(value, out, i)
                except RowFailure as e:
                    errors.append(f"{self.field}: {e.message}")
            if errors:
                out[schema.STATUS][i], out[schema.ERROR][i] = schema.STATUS_ERROR, "; ".join(errors)
        return out

    def _read(self, value, out, i) -> None:
        import numpy as np

        image = self.reader.open_image(self.field, value).convert("RGB")
        w, h = image.size
        reason = too_large(w, h, self.scale, self.max_output_side)
        if reason:
            raise RowFailure(self.field, f"{describe(value)}: {reason}")
        out[schema.IMAGE_RGB][i] = np.asarray(image, dtype=np.uint8).tobytes()
        out[schema.WIDTH][i], out[schema.HEIGHT][i] = w, h


class UpscaleStage(Stage):
    """Upscale each ok record's image (`image_rgb` at `width` x `height`) with its `seed`:
    the model loads once per stage instance; `width` and `height` become the upscaled size.

    A batch's images go to the model together (their windows share UNet calls); when the
    call fails, each image is retried alone, so one bad image fails only its row."""

    needs = (schema.ID, schema.IMAGE_RGB, schema.WIDTH, schema.HEIGHT, schema.SEED)
    needs += schema.STATUS_COLUMNS
    adds = schema.types(
        schema.IMAGE_RGB,
        schema.WIDTH,
        schema.HEIGHT,
        schema.SOURCE_WIDTH,
        schema.SOURCE_HEIGHT,
        schema.UPSCALE_MODEL,
        schema.UPSCALE_SECONDS,
        *schema.STATUS_COLUMNS,
    )

    def __init__(
        self,
        upscale: UpscaleConfig,
        field: str = "upscale",
        torch_threads: int | None = None,
    ):
        """`field`: what a row's error names when its image cannot be upscaled (the image
        column of `job: upscale`; `upscale` after generation, whose image k3batch made)."""
        from k3batch.model.superres.loading import load_upscaler, upscaler_label

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.config = upscale
        self.field = field
        if upscale.keep_source:
            self.adds = self.adds | schema.types(schema.SOURCE_IMAGE_RGB)
        self.label = upscaler_label(upscale)
        self.model = load_upscaler(upscale)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        import numpy as np

        out = start_output(batch, self.adds, carry=(schema.IMAGE_RGB, schema.WIDTH, schema.HEIGHT))
        todo, images = [], []
        for i in ok_rows(batch):
            raw = batch[schema.IMAGE_RGB][i]
            if raw is None:
                continue  # the encode stage names the row's missing image
            w, h = batch[schema.WIDTH][i], batch[schema.HEIGHT][i]
            reason = too_large(w, h, self.model.scale, self.config.max_output_side)
            if reason:
                fail_row(out, i, self.field, reason)
                continue
            todo.append(i)
            images.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3).copy())
        if not todo:
            return out
        seeds = [int(batch[schema.SEED][i]) for i in todo]
        for group in self._calls(todo, images, seeds, out):
            indices, upscaled, seconds = group
            for i, image in zip(indices, upscaled, strict=True):
                h, w = image.shape[:2]
                if self.config.keep_source:
                    out[schema.SOURCE_IMAGE_RGB][i] = batch[schema.IMAGE_RGB][i]
                out[schema.SOURCE_WIDTH][i] = batch[schema.WIDTH][i]
                out[schema.SOURCE_HEIGHT][i] = batch[schema.HEIGHT][i]
                out[schema.IMAGE_RGB][i] = np.ascontiguousarray(image).tobytes()
                out[schema.WIDTH][i], out[schema.HEIGHT][i] = w, h
                out[schema.UPSCALE_MODEL][i] = self.label
                out[schema.UPSCALE_SECONDS][i] = seconds
        return out

    def _calls(self, todo, images, seeds, out):
        """(row indices, upscaled images, seconds per image) of the batch in one call, or of
        each row alone after that call failed (the failing rows marked in `out`)."""
        steps = self.config.num_inference_steps
        try:
            yield todo, *self._timed(images, seeds, steps)
            return
        except Exception as e:  # noqa: BLE001 - isolate the row at fault below
            if len(todo) == 1:
                fail_row(out, todo[0], self.field, e)
                return
            log.warning("upscale: a batch of %d failed (%s); retrying one by one", len(todo), e)
        for i, image, seed in zip(todo, images, seeds, strict=True):
            try:
                yield [i], *self._timed([image], [seed], steps)
            except Exception as e:  # noqa: BLE001 - that row's error
                fail_row(out, i, self.field, e)

    def _timed(self, images, seeds, steps):
        started = time.perf_counter()
        if self.config.model == "flash-x2":
            upscaled = self.model.upscale(images, seeds)
        else:
            upscaled = self.model.upscale(images, seeds, num_inference_steps=steps)
        return upscaled, round((time.perf_counter() - started) / len(images), 4)
