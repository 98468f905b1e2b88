"""The generation job for every family member (text-to-image, image-to-image, inpainting,
Flash): Parquet rows -> validate -> read input images -> generate -> encode/write -> metadata.

read_parquet(input.uri, include_row_hash)
  [CheckpointFilter]    (Ray, on resume) drops rows an earlier run already committed
  -> ValidateStage      (tasks)      ids, per-row settings, bad rows marked
  [-> beautify, ChoosePromptStage]   when beautify.enabled or input.beautified_prompt_column
                                     (pipelines/beautify.py): generation reads `prompt_used`
  -> PrepareImagesStage (tasks)      rows with `image`/`mask`: read, size as the reference
  [-> TextEncodeStage   (actor pool) resources.text_encoder_pool: T5 in its own pool, per-row
                                     prompt embeddings for the generation actors]
  -> repartition        (streaming)  blocks of one generation batch
  -> GenerateStage      (actor pool) Kandinsky 3 or 2.2, model loaded once per actor; a row with
                                     num_images_per_prompt = N becomes N records (k, seed)
  [-> UpscaleStage      (actor pool) upscale.model: KandiSuperRes; width/height become the
                                     upscaled size (pipelines/upscale.py: add_upscale)]
  [-> ScoresStage       (actor pool with a CLIP model or classifiers, else tasks) scores.enabled:
                                     brightness, sharpness, clip_score, <name>_score]
  -> files:      WriteImagesStage  (tasks) OUTPUT/images/<key>.<ext>
                 -> write_parquet(OUTPUT/metadata/), output.rows_per_file rows a file
  -> webdataset: EncodeImagesStage (tasks) image bytes + sample key
                 -> shard sink     OUTPUT/shards/NNNNN.tar + NNNNN.parquet
"""

from __future__ import annotations

import os

from k3batch.config import JobConfig
from k3batch.dataflow import map_stage, read_input
from k3batch.job.execute import execute
from k3batch.job.kinds import JobContext, JobKind
from k3batch.job.pools import Pool, beautify_pools
from k3batch.model import family
from k3batch.model.superres.loading import ensure_tiny_upscaler
from k3batch.outputs import output_format
from k3batch.rows import records
from k3batch.rows.rules import RowRules
from k3batch.stages.generate import GenerateStage
from k3batch.stages.prepare import PrepareImagesStage
from k3batch.stages.scores import ScoresStage
from k3batch.stages.text_encode import TextEncodeStage
from k3batch.stages.validate import ValidateStage
from pipelines import beautify, upscale

VALIDATE_BATCH_SIZE = 256
PREPARE_BATCH_SIZE = 16  # decoded images are large; keep task batches small


def build(cfg: JobConfig, ctx: JobContext):
    """The job's Ray Data dataset, not yet executed (ends before the final write).

    From `ctx`: the input files' unified schema (`job.inputs.inspect_input`), so every file
    is read alike, also those Ray's schema sample skips; the job's crash journal
    (`k3batch.crashes`), or None for no crash isolation; ids that several input rows give
    (id -> rows), which those rows may not use; the output; and the stage overrides
    (`JobContext.stage`).
    """
    res = cfg.resources
    journal = ctx.journal
    # What the rows may bring (hints, mix items, image prompts), declared once for the job.
    capabilities = family.row_capabilities(cfg.model)
    ds = read_input(cfg, ctx.schema)
    ds = map_stage(
        ds,
        ValidateStage,
        {
            "rules": RowRules.from_config(cfg.generation, cfg.limits, capabilities),
            "prompt_column": cfg.input.prompt_column,
            "id_column": cfg.input.id_column,
            "duplicate_ids": ctx.duplicate_ids,
        },
        batch_size=VALIDATE_BATCH_SIZE,
        # The image-preparing stage's request: Ray fuses the two into one task per block
        # when no beautify stage sits between them (it fuses only equal requests).
        num_cpus=res.write_num_cpus,
        tracker=ctx.tracker,
    )
    ds, generate_from = beautify.add_to_text_to_image(ds, cfg, ctx.tracker)
    # Image reads and resizes stay off the GPU actors; rows without an image pass through.
    ds = map_stage(
        ds,
        PrepareImagesStage,
        {
            "max_side": cfg.limits.max_side,
            "base_dir": os.getcwd(),
            "storage_settings": cfg.storage.model_dump(),
            "capabilities": capabilities,
        },
        batch_size=PREPARE_BATCH_SIZE,
        num_cpus=res.write_num_cpus,
        tracker=ctx.tracker,
    )
    pool = res.text_encoder_pool
    if pool.enabled:
        # T5 in its own pool: rows arrive at generation with their prompt embeddings.
        ds = ds.repartition(target_num_rows_per_block=pool.batch_size)
        ds = map_stage(
            ds,
            TextEncodeStage,
            {
                "model": cfg.model,
                "prompt_column": generate_from,
                "torch_threads": res.torch_threads,
                "journal": journal,
            },
            batch_size=pool.batch_size,
            num_cpus=pool.num_cpus_per_actor,
            num_gpus=pool.num_gpus_per_actor,
            actors=(pool.num_actors, pool.max_actors or pool.num_actors),
            tracker=ctx.tracker,
        )
    # An actor pool takes whole blocks, and a Parquet file reads as few large blocks: cut
    # them to one generation batch each (streaming, no shuffle) so every actor gets work.
    ds = ds.repartition(target_num_rows_per_block=res.batch_size)
    generate, generate_kwargs = ctx.stage(
        GenerateStage,
        {
            "model": cfg.model,
            "decode_batch_size": res.decode_batch_size,
            "torch_threads": res.torch_threads,
            "prompt_column": generate_from,
            "text_encoder_pool": pool.enabled,
            "journal": journal,
            "max_crashes_per_row": cfg.faults.max_crashes_per_row,
            "max_images_per_call": res.batch_size,
            "warmup": {
                "width": cfg.generation.width,
                "height": cfg.generation.height,
                "batch_size": res.batch_size,
            },
        },
    )
    ds = map_stage(
        ds,
        generate,
        generate_kwargs,
        batch_size=res.batch_size,
        num_cpus=res.num_cpus_per_actor,
        num_gpus=res.num_gpus_per_actor,
        actors=(res.num_actors, res.max_actors or res.num_actors),
        tracker=ctx.tracker,
    )
    # Before scores: they describe the image written, the upscaled one.
    ds = upscale.add_upscale(ds, cfg, ctx.tracker, field="upscale")
    sc = cfg.scores
    if sc.enabled:
        # Before the encode stage, which drops the decoded image the scores read. Models
        # load once per actor; brightness and sharpness alone are plain CPU tasks.
        models = sc.uses_models
        ds = map_stage(
            ds,
            ScoresStage,
            {"scores": sc, "prompt_column": generate_from},
            batch_size=sc.batch_size,
            num_cpus=sc.num_cpus_per_actor if models else res.write_num_cpus,
            num_gpus=sc.num_gpus_per_actor if models else 0,
            actors=(sc.num_actors, sc.num_actors) if models else None,
            tracker=ctx.tracker,
        )
    stage, kwargs = ctx.output.format.encode_stage(cfg, ctx.output)
    kwargs["several_images"] = records.several_images(
        cfg.generation.num_images_per_prompt, ctx.schema.names if ctx.schema else ()
    )
    return map_stage(
        ds,
        stage,
        kwargs,
        batch_size=res.batch_size,
        num_cpus=res.write_num_cpus,
        tracker=ctx.tracker,
    )


class TextToImage(JobKind):
    """Prompts (and images, masks) to images and metadata, in the configured output format."""

    name = "text_to_image"

    def pools(self, cfg: JobConfig) -> list[Pool]:
        r, t = cfg.resources, cfg.resources.text_encoder_pool
        pools = [
            Pool(
                "resources (generation)",
                r.num_actors,
                r.num_cpus_per_actor,
                r.num_gpus_per_actor,
                r.num_gpus_per_actor,
            )
        ]
        if t.enabled:
            pools.append(
                Pool(
                    "resources.text_encoder_pool",
                    t.num_actors,
                    t.num_cpus_per_actor,
                    t.num_gpus_per_actor,
                    t.num_gpus_per_actor,
                )
            )
        sc = cfg.scores
        if sc.uses_models:
            pools.append(
                Pool(
                    "scores",
                    sc.num_actors,
                    sc.num_cpus_per_actor,
                    sc.num_gpus_per_actor,
                    sc.num_gpus_per_actor,
                )
            )
        pools += upscale.upscale_pools(cfg)
        return pools + (beautify_pools(cfg) if cfg.beautify.enabled else [])

    def prepare(self, cfg: JobConfig) -> None:
        # Build once on the driver so local actors find it ready (they would build the same).
        family.of(cfg.model.name).ensure_tiny(cfg.model)
        ensure_tiny_upscaler(cfg.upscale)

    def run(self, cfg: JobConfig, ctx: JobContext) -> None:
        execute(cfg, ctx, build)

    def finalise(self, cfg: JobConfig, ctx: JobContext) -> None:
        ctx.output.format.finalise(ctx.output, ctx.num_records)

    def output_lines(self, run: dict) -> list[str]:
        return output_format(run.get("format", "files")).output_lines(run["output"])


KIND = TextToImage()
