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
  -> GenerateStage      (actor pool) Kandinsky 3, model loaded once per actor
  -> files:      WriteImagesStage  (tasks) OUTPUT/images/<key>.<ext>
                 -> write_parquet(OUTPUT/metadata/), output.rows_per_file rows a file
  -> webdataset: EncodeImagesStage (tasks) image bytes + sample key
                 -> shard sink     OUTPUT/shards/NNNNN.tar + NNNNN.parquet
"""

from __future__ import annotations

import os
import warnings

from k3batch import crashes, resume, shards, storage, testhooks
from k3batch.config import JobConfig
from k3batch.dataflow import map_stage, read_input
from k3batch.images import EXTENSIONS
from k3batch.rows import RowRules
from k3batch.stages.generate import GenerateStage
from k3batch.stages.prepare import PrepareImagesStage
from k3batch.stages.text_encode import TextEncodeStage
from k3batch.stages.validate import ValidateStage
from k3batch.stages.write import EncodeImagesStage, WriteImagesStage
from pipelines import beautify

VALIDATE_BATCH_SIZE = 256
PREPARE_BATCH_SIZE = 16  # decoded images are large; keep task batches small


def build(cfg: JobConfig, schema=None, journal=None, duplicate_ids=None, test_hooks=None):
    """The job's Ray Data dataset, not yet executed (ends before the final write).

    `schema`: the input files' unified schema (`runner.inspect_input`), so every file is read
    alike, also those Ray's schema sample skips. `journal`: the job's crash journal
    (`k3batch.crashes`), or None for no crash isolation. `duplicate_ids`: ids that several
    input rows give (id -> rows), which those rows may not use. `test_hooks`: see
    k3batch.testhooks.
    """

    res = cfg.resources
    settings = cfg.storage.model_dump()
    ds = read_input(cfg, schema)
    ds = map_stage(
        ds,
        ValidateStage,
        {
            "rules": RowRules.from_config(cfg.generation, cfg.limits, cfg.model.name),
            "prompt_column": cfg.input.prompt_column,
            "id_column": cfg.input.id_column,
            "duplicate_ids": duplicate_ids,
        },
        batch_size=VALIDATE_BATCH_SIZE,
        # The image-preparing stage's request: Ray fuses the two into one task per block
        # when no beautify stage sits between them (it fuses only equal requests).
        num_cpus=res.write_num_cpus,
    )
    ds, generate_from = beautify.add_to_text_to_image(ds, cfg)
    # Image reads and resizes stay off the GPU actors; rows without an image pass through.
    ds = map_stage(
        ds,
        PrepareImagesStage,
        {"max_side": cfg.limits.max_side, "base_dir": os.getcwd(), "storage_settings": settings},
        batch_size=PREPARE_BATCH_SIZE,
        num_cpus=res.write_num_cpus,
    )
    pool = res.text_encoder_pool
    if pool.enabled:
        # T5 in its own pool: rows arrive at generation with their prompt embeddings.
        ds = ds.repartition(target_num_rows_per_block=pool.batch_size)
        ds = map_stage(
            ds,
            TextEncodeStage,
            {
                "model": cfg.model.model_dump(),
                "prompt_column": generate_from,
                "torch_threads": res.torch_threads,
                "journal": journal,
            },
            batch_size=pool.batch_size,
            num_cpus=pool.num_cpus_per_actor,
            num_gpus=pool.num_gpus_per_actor,
            actors=(pool.num_actors, pool.max_actors or pool.num_actors),
        )
    # An actor pool takes whole blocks, and a Parquet file reads as few large blocks: cut
    # them to one generation batch each (streaming, no shuffle) so every actor gets work.
    ds = ds.repartition(target_num_rows_per_block=res.batch_size)
    ds = map_stage(
        ds,
        GenerateStage,
        {
            "model": cfg.model.model_dump(),
            "decode_batch_size": res.decode_batch_size,
            "torch_threads": res.torch_threads,
            "prompt_column": generate_from,
            "text_encoder_pool": pool.enabled,
            "journal": journal,
            "max_crashes_per_row": cfg.faults.max_crashes_per_row,
            "test_hooks": test_hooks,
            "warmup": {
                "width": cfg.generation.width,
                "height": cfg.generation.height,
                "batch_size": res.batch_size,
            },
        },
        batch_size=res.batch_size,
        num_cpus=res.num_cpus_per_actor,
        num_gpus=res.num_gpus_per_actor,
        actors=(res.num_actors, res.max_actors or res.num_actors),
    )
    encode = {"image_format": cfg.output.image_format, "quality": cfg.output.quality}
    if cfg.output.format == "files":
        stage, kwargs = (
            WriteImagesStage,
            {
                **encode,
                "output_uri": cfg.output.uri,
                "storage_settings": settings,
            },
        )
    else:
        stage, kwargs = EncodeImagesStage, encode
    return map_stage(ds, stage, kwargs, batch_size=res.batch_size, num_cpus=res.write_num_cpus)


def write(ds, cfg: JobConfig, num_rows: int) -> None:
    settings = cfg.storage.model_dump()
    # The same CPU request as the encode/write stage lets Ray fuse the two into one task per
    # block (Ray fuses only operators whose remote args match).
    remote_args = {"num_cpus": cfg.resources.write_num_cpus}
    if cfg.output.format == "files":
        fs, path = storage.arrow_filesystem(storage.join(cfg.output.uri, "metadata"), settings)
        rows = cfg.output.rows_per_file
        if rows <= cfg.resources.batch_size:
            ds.write_parquet(path, filesystem=fs, ray_remote_args=remote_args)
            return
        # Ray gathers a file's rows before the task that writes it: fused with the image
        # write, batches would wait there holding their decoded images. Half the request
        # (a metadata write is light) keeps the two apart, so only metadata rows wait.
        ds.write_parquet(
            path,
            filesystem=fs,
            min_rows_per_file=rows,
            ray_remote_args={"num_cpus": cfg.resources.write_num_cpus / 2},
        )
        return
    shards_uri = storage.join(cfg.output.uri, "shards")
    fsspec_fs, root = storage.filesystem(shards_uri, settings)
    fs, path = storage.arrow_filesystem(shards_uri, settings)
    ds.write_datasink(
        shards.shard_sink(
            path,
            filesystem=fs,
            first=shards.next_number(fsspec_fs, root),
            width=shards.digits(num_rows),
            image_ext=EXTENSIONS[cfg.output.image_format],
            shard_size=cfg.output.shard_size,
        ),
        ray_remote_args=remote_args,
    )


def run(cfg: JobConfig, num_rows: int, schema=None, duplicate_ids=None, journal=None) -> None:
    """Execute the job with Ray Data's checkpointing on, so a rerun resumes.

    `journal`: the job's crash journal actor (the runner passes its `progress.JobActor`);
    None starts one for this run.
    """
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    previous = (
        ctx.checkpoint_config,
        ctx.execution_no_progress_timeout_s,
        ctx.raise_original_map_exception,
    )
    ctx.checkpoint_config = resume.checkpoint_config(cfg)
    if cfg.faults.stall_timeout_s:
        ctx.execution_no_progress_timeout_s = cfg.faults.stall_timeout_s
    # Ray wraps a stage's exception in UserCodeException, and the original (a StorageError,
    # say) does not survive the trip to the driver, only its traceback text does: keep it,
    # so the runner can say what stopped the job.
    ctx.raise_original_map_exception = True
    own_journal = journal is None
    if own_journal:
        journal = crashes.start_journal()
    hooks = testhooks.from_env()
    try:
        # The dataset takes a copy of the context: checkpoint config and stall timeout included.
        ds = build(cfg, schema, journal, duplicate_ids, hooks)
        with warnings.catch_warnings():
            # Ray turns checkpointing off with only a warning when the plan does not allow it
            # (it must run from a Read to a Write); a job that silently cannot resume is worse
            # than one that fails at start.
            warnings.filterwarnings("error", message="You've enabled checkpointing")
            write(ds, cfg, num_rows)
    except BaseException:
        crashes.stop_workers(journal)
        raise
    finally:
        (
            ctx.checkpoint_config,
            ctx.execution_no_progress_timeout_s,
            ctx.raise_original_map_exception,
        ) = previous
        if own_journal:
            ray.kill(journal)
        testhooks.clean_up(hooks)
