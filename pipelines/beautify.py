"""Beautify-only job, and the beautification steps the text-to-image job adds.

Beautify-only (`job: beautify`): prompt table in -> prompt table out, nothing generated:

read_parquet(input.uri)
  -> PromptRowsStage   (tasks)       ids as text-to-image derives them; empty prompts marked
  -> beautify          (vllm: Ray Data LLM engine pool | openai: client actor pool)
  -> metadata writer (OUTPUT/metadata/) the input columns + id, status, error,
                                     beautified_prompt, beautify_error

A text-to-image job then reads that table with `input.beautified_prompt_column:
beautified_prompt` and generates from it without running the LLM again.
"""

from __future__ import annotations

from k3batch import resume, schema, storage
from k3batch.beautify.choose import tokenizer_path
from k3batch.config import JobConfig
from k3batch.dataflow import map_stage, read_input
from k3batch.job.kinds import JobContext, JobKind
from k3batch.job.pools import Pool, beautify_pools
from k3batch.model import family
from k3batch.stages.beautify import (
    ChoosePromptStage,
    OpenAIBeautifyStage,
    PromptRowsStage,
)

ROWS_BATCH_SIZE = 256
CHOOSE_CPUS = 0.25  # tokenizing short prompts


def add_beautify(ds, cfg: JobConfig, tracker=None, prompt_column: str = schema.PROMPT):
    """Append the configured backend: adds `beautified_prompt` and `beautify_error`."""
    b = cfg.beautify
    if b.backend == "vllm":
        from k3batch.beautify.ray_llm import add_vllm_beautify

        return add_vllm_beautify(ds, b, prompt_column)
    o = b.openai
    return map_stage(
        ds,
        OpenAIBeautifyStage,
        {
            "base_url": o.base_url,
            "model": o.model or b.model,
            "system_prompt": b.system_prompt,
            "sampling": b.sampling,
            "api": o.api,
            "api_key_env": o.api_key_env,
            "qps": o.qps / o.num_actors if o.qps else None,
            "max_in_flight": o.max_in_flight,
            "max_retries": o.max_retries,
            "retry_backoff_s": o.retry_backoff_s,
            "timeout_s": o.timeout_s,
            "prompt_column": prompt_column,
        },
        batch_size=o.batch_size,
        num_cpus=o.num_cpus_per_actor,
        actors=(o.num_actors, o.num_actors),
        tracker=tracker,
    )


def add_to_text_to_image(ds, cfg: JobConfig, tracker=None):
    """Beautify (or take beautified prompts from the input) and choose each row's prompt.

    Returns the dataset and the column generation reads: `prompt_used` when beautified
    prompts are in play, else `prompt`.
    """
    if cfg.beautify.enabled:
        ds = add_beautify(ds, cfg, tracker)
        candidate = schema.BEAUTIFIED_PROMPT
    elif cfg.input.beautified_prompt_column:
        candidate = cfg.input.beautified_prompt_column
    else:
        return ds, schema.PROMPT
    ds = map_stage(
        ds,
        ChoosePromptStage,
        {
            "model_path": tokenizer_path(cfg.model),
            "max_tokens": family.MEMBERS[cfg.model.name].max_prompt_tokens,
            "candidate_column": candidate,
            "on_too_long": cfg.beautify.on_too_long,
        },
        batch_size=ROWS_BATCH_SIZE,
        num_cpus=CHOOSE_CPUS,
        tracker=tracker,
    )
    return ds, schema.PROMPT_USED


def build(cfg: JobConfig, tracker=None):
    """The beautify-only dataset, not yet executed (ends before the write)."""
    ds = read_input(cfg)
    ds = map_stage(
        ds,
        PromptRowsStage,
        {
            "prompt_column": cfg.input.prompt_column,
            "id_column": cfg.input.id_column,
            "max_chars": cfg.limits.max_prompt_chars,
        },
        batch_size=ROWS_BATCH_SIZE,
        num_cpus=0.25,
        tracker=tracker,
    )
    return add_beautify(ds, cfg, tracker, prompt_column=cfg.input.prompt_column)


class Beautify(JobKind):
    """Beautify-only: a prompt table in, the same table with beautified prompts out
    (OUTPUT/metadata/, as the `files` format keeps its records). It does not resume."""

    name = "beautify"
    resumes = False
    makes_images = False
    uses_diffusion_model = False

    def output_format(self, cfg: JobConfig) -> str:
        return "files"  # its records are metadata/*.parquet whatever output.format says

    def pools(self, cfg: JobConfig) -> list[Pool]:
        return beautify_pools(cfg)

    def run(self, cfg: JobConfig, ctx: JobContext) -> None:
        from k3batch.outputs.files import metadata_sink

        fs, path = ctx.output.arrow_filesystem("metadata")
        # The files format's metadata writer: each file with its stats (outputs.stats).
        sink = metadata_sink(
            path, filesystem=fs, config_hash=resume.fingerprint(resume.job_identity(cfg))
        )
        build(cfg, ctx.tracker).write_datasink(sink)

    def output_lines(self, run: dict) -> list[str]:
        return [f"prompts       {storage.join(run['output'], 'metadata')}/ (Parquet)"]


KIND = Beautify()
