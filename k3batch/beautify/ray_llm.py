"""The `vllm` backend: Ray Data LLM (`vLLMEngineProcessorConfig` + `build_processor`).

pack_rows (tasks)  ->  processor: preprocess -> vLLM engines (own actor pool) -> postprocess
                   ->  unpack_rows (tasks): the original row + beautified_prompt, beautify_error

The processor's row-wise maps turn rows into Python dicts and back, which would let Arrow
re-infer every column (uint64 seeds, all-null columns): so each row travels as one packed
Arrow IPC record next to the few fields the LLM needs, and comes back with its exact types.
Rows that need no LLM call (status=error, empty prompt) are marked as errors before the
engine, which Ray Data LLM then passes by; a row the engine rejects becomes an error row
(`should_continue_on_error`) and falls back to its original prompt; neither fails the job.
"""

from __future__ import annotations

import functools
import secrets

import pyarrow as pa

from k3batch import schema
from k3batch.beautify import choose
from k3batch.beautify.config import BeautifyConfig
from k3batch.beautify.prompt import clean_output, format_prompt, request_seed

PACKED = "__k3batch_row"
LLM_PROMPT = "__k3batch_llm_prompt"
LLM_SEED = "__k3batch_llm_seed"
INFERENCE_ERROR = "__inference_error__"  # Ray Data LLM's per-row error column
SKIPPED = "k3batch: not beautified"  # marks rows that must not reach the engine
TASK_CPUS = 0.25  # pack/unpack and the processor's row maps are light


def _pack_one(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def pack_rows(
    table: pa.Table,
    *,
    system_prompt: str,
    base_seed: int | None,
    prompt_column: str = "prompt",
) -> pa.Table:
    """Each row packed into one binary cell, plus its LLM prompt (null: skip) and seed."""
    table = table.replace_schema_metadata(None)  # pandas metadata would repeat per row
    prompts = table.column(prompt_column).to_pylist()
    statuses = table.column(schema.STATUS).to_pylist()
    ids = table.column(schema.ID).to_pylist()
    packed, llm_prompts, seeds = [], [], []
    for i in range(table.num_rows):
        packed.append(_pack_one(table.slice(i, 1)))
        if choose.wants_beautify(prompts[i], statuses[i]):
            llm_prompts.append(format_prompt(prompts[i], system_prompt))
            seed = request_seed(base_seed, ids[i])
            # Unseeded: a fresh seed per request is the same as none. The column never holds
            # a null: Ray Data LLM's row maps would then re-infer it as float and fail.
            seeds.append(secrets.randbits(63) if seed is None else seed)
        else:
            llm_prompts.append(None)
            seeds.append(-1)
    return pa.table(
        {
            PACKED: pa.array(packed, pa.binary()),
            LLM_PROMPT: pa.array(llm_prompts, pa.string()),
            LLM_SEED: pa.array(seeds, pa.int64()),
        }
    )


def unpack_rows(table: pa.Table) -> pa.Table:
    """The original rows with `beautified_prompt` and `beautify_error` set."""
    names = table.column_names
    packed = table.column(PACKED).to_pylist()
    texts = table.column("generated_text").to_pylist() if "generated_text" in names else None
    errors = table.column(INFERENCE_ERROR).to_pylist() if INFERENCE_ERROR in names else None
    parts, beautified, failed = [], [], []
    for i, blob in enumerate(packed):
        parts.append(pa.ipc.open_stream(blob).read_all())
        error = errors[i] if errors is not None else None
        if error == SKIPPED:
            beautified.append(None)
            failed.append(None)
        elif error:
            beautified.append(None)
            failed.append(f"vllm: {error}")
        else:
            beautified.append(clean_output(texts[i] if texts is not None else None))
            failed.append(None)
    if not parts:  # an empty block: nothing to unpack
        return pa.table(
            {
                name: pa.array([], pa.string())
                for name in (schema.BEAUTIFIED_PROMPT, schema.BEAUTIFY_ERROR)
            }
        )
    # Blocks from different input files may disagree on a column's type only by nullness.
    out = pa.concat_tables(parts, promote_options="default")
    for name, values in ((schema.BEAUTIFIED_PROMPT, beautified), (schema.BEAUTIFY_ERROR, failed)):
        column = pa.array(values, pa.string())
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, column)
        else:
            out = out.append_column(name, column)
    return out


def _preprocess(row: dict, sampling: dict) -> dict:
    if row[LLM_PROMPT] is None:
        return {INFERENCE_ERROR: SKIPPED}
    params = {
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "max_tokens": sampling["max_tokens"],
        "stop": list(sampling.get("stop") or []),
        "seed": int(row[LLM_SEED]),
        **(sampling.get("extra") or {}),
    }
    # "" (not absent): once one row of a block carries an error, Ray fills the others with
    # None, which its stages would also take for an error.
    return {"prompt": row[LLM_PROMPT], "sampling_params": params, INFERENCE_ERROR: ""}


def _postprocess(row: dict) -> dict:
    return {PACKED: row[PACKED], "generated_text": row["generated_text"]}


def processor_config(cfg: BeautifyConfig):
    """Ray Data LLM's processor config for the `vllm` backend."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = cfg.vllm
    engine_kwargs = {
        "dtype": v.dtype,
        "max_model_len": v.max_model_len,
        "enable_prefix_caching": v.enable_prefix_caching,
    }
    if v.num_gpus_per_engine > 1:
        engine_kwargs["tensor_parallel_size"] = v.num_gpus_per_engine
    engine_kwargs.update(v.engine_kwargs)
    on_cpu = v.num_gpus_per_engine == 0
    return vLLMEngineProcessorConfig(
        model_source=cfg.model,
        engine_kwargs=engine_kwargs,
        batch_size=v.batch_size,
        concurrency=(v.num_engines, v.max_engines or v.num_engines),
        max_concurrent_batches=v.max_concurrent_batches,
        accelerator_type=v.accelerator_type,
        runtime_env={"env_vars": dict(v.env)} if v.env else None,
        # The prompt is formatted by k3batch (exact Kandinsky 3.1 text) and the engine
        # tokenizes it: no chat-template or tokenizer actors competing for CPUs.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        # Without a CPU bundle an engine asks Ray for a GPU and, on a CPU machine, waits
        # forever; GPU engines keep Ray's default bundles (1 GPU + 1 CPU per worker).
        placement_group_config={"bundles": [{"CPU": v.num_cpus_per_engine}]} if on_cpu else None,
        # vLLM's Prometheus stat logger is for GPU clusters; on CPU engines it is noise.
        log_engine_metrics=not on_cpu,
    )


def add_vllm_beautify(ds, cfg: BeautifyConfig, prompt_column: str = "prompt"):
    """Append the vLLM beautification to a Ray dataset that has id, status and the prompt."""
    from ray.data.llm import build_processor

    sampling = cfg.sampling.model_dump()
    processor = build_processor(
        processor_config(cfg),
        preprocess=functools.partial(_preprocess, sampling=sampling),
        postprocess=_postprocess,
        preprocess_map_kwargs={"num_cpus": TASK_CPUS},
        postprocess_map_kwargs={"num_cpus": TASK_CPUS},
    )
    batch = cfg.vllm.batch_size
    ds = ds.map_batches(
        pack_rows,
        fn_kwargs={
            "system_prompt": cfg.system_prompt,
            "base_seed": cfg.sampling.seed,
            "prompt_column": prompt_column,
        },
        batch_format="pyarrow",
        batch_size=batch,
        num_cpus=TASK_CPUS,
        zero_copy_batch=True,
    )
    ds = processor(ds)
    return ds.map_batches(unpack_rows, batch_format="pyarrow", batch_size=batch, num_cpus=TASK_CPUS)
