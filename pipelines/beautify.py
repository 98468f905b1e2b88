"""Beautify-only job, and the beautification steps the text-to-image job adds.

Beautify-only (`job: beautify`): prompt table in -> prompt table out, nothing generated:

read_parquet(input.uri)
  -> PromptRowsStage   (tasks)       ids as text-to-image derives them; empty prompts marked
  -> beautify          (vllm: Ray Data LLM engine pool | openai: client actor pool)
  -> write_parquet(OUTPUT/metadata/) the input columns + id, status, error,
                                     beautified_prompt, beautify_error

A text-to-image job then reads that table with `input.beautified_prompt_column:
beautified_prompt` and generates from it without running the LLM again.
"""

from __future__ import annotations

from k3batch import storage
from k3batch.config import JobConfig
from k3batch.dataflow import map_stage, read_input
from k3batch.stages.beautify import (
    BEAUTIFIED,
    PROMPT_USED,
    ChoosePromptStage,
    OpenAIBeautifyStage,
    PromptRowsStage,
)

ROWS_BATCH_SIZE = 256
CHOOSE_CPUS = 0.25  # tokenizing short prompts


def add_beautify(ds, cfg: JobConfig, prompt_column: str = "prompt"):
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
            "sampling": b.sampling.model_dump(),
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
    )


def add_to_text_to_image(ds, cfg: JobConfig):
    """Beautify (or take beautified prompts from the input) and choose each row's prompt.

    Returns the dataset and the column generation reads: `prompt_used` when beautified
    prompts are in play, else `prompt`.
    """
    if cfg.beautify.enabled:
        ds = add_beautify(ds, cfg)
        candidate = BEAUTIFIED
    elif cfg.input.beautified_prompt_column:
        candidate = cfg.input.beautified_prompt_column
    else:
        return ds, "prompt"
    ds = map_stage(
        ds,
        ChoosePromptStage,
        {
            "model_path": cfg.model.path,
            "candidate_column": candidate,
            "on_too_long": cfg.beautify.on_too_long,
        },
        batch_size=ROWS_BATCH_SIZE,
        num_cpus=CHOOSE_CPUS,
    )
    return ds, PROMPT_USED


def build(cfg: JobConfig):
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
    )
    return add_beautify(ds, cfg, prompt_column=cfg.input.prompt_column)


def run(cfg: JobConfig) -> None:
    """Execute the beautify-only job; the prompt table lands in OUTPUT/metadata/."""
    uri = storage.join(cfg.output.uri, "metadata")
    fs, path = storage.arrow_filesystem(uri, cfg.storage.model_dump())
    build(cfg).write_parquet(path, filesystem=fs)
