"""The generation job for every family member (text-to-image, image-to-image, inpainting,
Flash): Parquet rows -> validate -> read input images -> generate -> encode/write -> metadata.

read_parquet(input.uri)
  -> ValidateStage      (tasks)      ids, per-row settings, bad rows marked
  -> PrepareImagesStage (tasks)      rows with `image`/`mask`: read, size as the reference
  -> repartition        (streaming)  blocks of one generation batch
  -> GenerateStage      (actor pool) Kandinsky 3, model loaded once per actor
  -> WriteImagesStage   (tasks, CPU) OUTPUT/images/<key>.<ext>
  -> write_parquet(OUTPUT/metadata/)
"""

from __future__ import annotations

import os

from k3batch import storage
from k3batch.config import JobConfig
from k3batch.dataflow import map_stage
from k3batch.rows import RowRules
from k3batch.stages.generate import GenerateStage
from k3batch.stages.prepare import PrepareImagesStage
from k3batch.stages.validate import ValidateStage
from k3batch.stages.write import WriteImagesStage

VALIDATE_BATCH_SIZE = 256
PREPARE_BATCH_SIZE = 16  # decoded images are large; keep task batches small


def build(cfg: JobConfig):
    """The job's Ray Data dataset, not yet executed (ends before the metadata write)."""
    import ray.data

    res = cfg.resources
    ds = ray.data.read_parquet(cfg.input.uri, include_row_hash=True)
    ds = map_stage(
        ds,
        ValidateStage,
        {
            "rules": RowRules.from_config(cfg.generation, cfg.limits, cfg.model.name),
            "prompt_column": cfg.input.prompt_column,
            "id_column": cfg.input.id_column,
        },
        batch_size=VALIDATE_BATCH_SIZE,
        num_cpus=0.25,
    )
    # Image reads and resizes stay off the GPU actors; rows without an image pass through.
    ds = map_stage(
        ds,
        PrepareImagesStage,
        {"max_side": cfg.limits.max_side, "base_dir": os.getcwd()},
        batch_size=PREPARE_BATCH_SIZE,
        num_cpus=res.write_num_cpus,
    )
    # An actor pool takes whole blocks, and a Parquet file reads as few large blocks: cut
    # them to one generation batch each (streaming, no shuffle) so every actor gets work.
    ds = ds.repartition(target_num_rows_per_block=res.batch_size)
    ds = map_stage(
        ds,
        GenerateStage,
        {"model": cfg.model.model_dump(), "decode_batch_size": res.decode_batch_size},
        batch_size=res.batch_size,
        num_cpus=res.num_cpus_per_actor,
        num_gpus=res.num_gpus_per_actor,
        actors=(res.num_actors, res.max_actors or res.num_actors),
    )
    ds = map_stage(
        ds,
        WriteImagesStage,
        {
            "output_uri": cfg.output.uri,
            "image_format": cfg.output.image_format,
            "quality": cfg.output.quality,
        },
        batch_size=res.batch_size,
        num_cpus=res.write_num_cpus,
    )
    return ds


def run(cfg: JobConfig) -> None:
    """Execute the job; metadata lands in OUTPUT/metadata/ as Parquet."""
    ds = build(cfg)
    ds.write_parquet(storage.join(cfg.output.uri, "metadata"))
