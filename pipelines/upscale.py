"""The upscaling job (`job: upscale`), and the upscaling step a generation job adds.

read_parquet(input.uri, include_row_hash)
  [CheckpointFilter]    (Ray, on resume) drops rows an earlier run already committed
  -> UpscaleRowsStage   (tasks)       ids, seeds, `input.image_column` read as raw RGB at its
                                      own size; a missing, unreadable or too large image is
                                      the row's error naming the column
  -> repartition        (streaming)   blocks of one upscaling batch
  -> UpscaleStage       (actor pool)  KandiSuperRes, loaded once per actor
  -> the output format's encode stage and writer, run as text_to_image's
                                      (`job.execute`: checkpointing, crash journal, write)

Each row is one record (k = 0), whatever `num_images_per_prompt` an earlier job's metadata
holds: resume, the input count and the accounting read `record_rules`.
"""

from __future__ import annotations

import os

from k3batch.config import JobConfig
from k3batch.dataflow import map_stage, read_input
from k3batch.job.execute import execute
from k3batch.job.kinds import JobContext, JobKind
from k3batch.job.pools import Pool
from k3batch.model.superres.loading import ensure_tiny_upscaler
from k3batch.outputs import output_format
from k3batch.rows.rules import RowRules
from k3batch.stages.upscale import UpscaleRowsStage, UpscaleStage

ROWS_BATCH_SIZE = 16  # decoded images are large; keep task batches small


def upscale_pools(cfg: JobConfig) -> list[Pool]:
    u = cfg.upscale
    if not u.enabled:
        return []
    return [
        Pool(
            "upscale",
            u.num_actors,
            u.num_cpus_per_actor,
            u.num_gpus_per_actor,
            u.num_gpus_per_actor,
        )
    ]


def add_upscale(ds, cfg: JobConfig, tracker=None, field: str = "upscale"):
    """Append the upscaling actor pool when `upscale.model` is set. `field`: what a row's
    error names when its image cannot be upscaled."""
    u = cfg.upscale
    if not u.enabled:
        return ds
    ds = ds.repartition(target_num_rows_per_block=u.batch_size)
    return map_stage(
        ds,
        UpscaleStage,
        {"upscale": u, "field": field, "torch_threads": cfg.resources.torch_threads},
        batch_size=u.batch_size,
        num_cpus=u.num_cpus_per_actor,
        num_gpus=u.num_gpus_per_actor,
        actors=(u.num_actors, u.num_actors),
        tracker=tracker,
    )


def build(cfg: JobConfig, ctx: JobContext):
    """The upscaling dataset, not yet executed (ends before the final write)."""
    ds = read_input(cfg, ctx.schema)
    ds = map_stage(
        ds,
        UpscaleRowsStage,
        {
            "image_column": cfg.input.image_column,
            "id_column": cfg.input.id_column,
            "seed": cfg.generation.seed,
            "scale": cfg.upscale.scale,
            "max_output_side": cfg.upscale.max_output_side,
            "base_dir": os.getcwd(),
            "storage_settings": cfg.storage.model_dump(),
            "duplicate_ids": ctx.duplicate_ids,
        },
        batch_size=ROWS_BATCH_SIZE,
        num_cpus=cfg.resources.write_num_cpus,
        tracker=ctx.tracker,
    )
    ds = add_upscale(ds, cfg, ctx.tracker, field=cfg.input.image_column)
    stage, kwargs = ctx.output.format.encode_stage(cfg, ctx.output)
    return map_stage(
        ds,
        stage,
        kwargs,
        batch_size=cfg.upscale.batch_size,
        num_cpus=cfg.resources.write_num_cpus,
        tracker=ctx.tracker,
    )


class Upscale(JobKind):
    """Images in (`input.image_column`), upscaled images and metadata out, in the configured
    output format; resumes like a generation job."""

    name = "upscale"
    uses_diffusion_model = False

    def input_columns(self, cfg: JobConfig) -> dict[str, str]:
        return {"input.image_column": cfg.input.image_column}

    def record_rules(self, cfg: JobConfig):
        return RowRules(images_column=None)

    def pools(self, cfg: JobConfig) -> list[Pool]:
        return upscale_pools(cfg)

    def prepare(self, cfg: JobConfig) -> None:
        ensure_tiny_upscaler(cfg.upscale)

    def run(self, cfg: JobConfig, ctx: JobContext) -> None:
        execute(cfg, ctx, build)

    def finalise(self, cfg: JobConfig, ctx: JobContext) -> None:
        ctx.output.format.finalise(ctx.output, ctx.num_records)

    def output_lines(self, run: dict) -> list[str]:
        return output_format(run.get("format", "files")).output_lines(run["output"])


KIND = Upscale()
