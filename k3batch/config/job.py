"""`faults:`, `ray:` and the whole job's config, `JobConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from k3batch.beautify.config import BeautifyConfig
from k3batch.config.base import Strict
from k3batch.config.generation import GenerationConfig, LimitsConfig, apply_member_defaults
from k3batch.config.io import InputConfig, OutputConfig, StorageConfig
from k3batch.config.model import ModelConfig
from k3batch.config.resources import ResourcesConfig
from k3batch.config.scores import ScoresConfig
from k3batch.config.upscale import UpscaleConfig


class FaultsConfig(Strict):
    """How a job reacts to stalls and crashed workers (bad rows and storage: see the README)."""

    stall_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Fail the job, naming the stage that stopped, when no stage has made "
        "progress (no batch moved) for this many seconds; rows finished before are kept and a "
        "rerun resumes. Must exceed the time to load the model and generate the first batch. "
        "null: RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S if set, else 1800 (Ray Data's default).",
    )
    max_crashes_per_row: int = Field(
        2,
        ge=1,
        description="A generation batch whose worker process died (killed, segfault, out of "
        "memory) is retried on a replacement worker one row at a time; a row that was running "
        "alone when a worker died this many times becomes `status=error` instead of being "
        "retried again (Ray alone would retry it forever).",
    )


class RayConfig(Strict):
    address: str | None = Field(
        None,
        description="Ray cluster to join. null: RAY_ADDRESS if set (as under `ray job submit`), "
        "else a new local Ray instance.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a new local Ray instance; null = all."
    )
    num_gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs of a new local Ray instance; null = the GPUs Ray detects (capped by "
        "CUDA_VISIBLE_DEVICES). A job whose pools need more fails at start.",
    )
    object_store_memory_mb: int | None = Field(
        None,
        ge=75,
        description="Object store size of a new local Ray instance; null = Ray's default.",
    )
    metrics_export_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port where a new local Ray instance serves Prometheus metrics "
        "(http://127.0.0.1:PORT/metrics); null = a free port Ray picks. On a cluster, set it "
        "with `ray start --metrics-export-port`.",
    )


class JobConfig(Strict):
    job: Literal["text_to_image", "beautify", "upscale"] = Field(
        "text_to_image",
        description="`text_to_image`: prompts to images and metadata. `beautify`: prompts to a "
        "prompt table with `beautified_prompt` (no diffusion model; needs beautify.enabled). "
        "`upscale`: a table of images (`input.image_column`) to upscaled images and metadata "
        "(needs upscale.model; no diffusion model of `model:` loads).",
    )
    input: InputConfig = Field(description="Where the prompt table is read from.")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Which model and how to load it."
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Generation defaults for every row."
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Per-row validation limits."
    )
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Batching and actor pool resources."
    )
    output: OutputConfig = Field(description="Where images and metadata are written.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="How input and output URIs are reached (endpoint, region, profile); no secrets.",
    )
    faults: FaultsConfig = Field(
        default_factory=FaultsConfig,
        description="Stall timeout and crashed-worker handling.",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="How to reach Ray.")
    beautify: BeautifyConfig = Field(
        default_factory=BeautifyConfig,
        description="Prompt beautification with an LLM between validation and generation.",
    )
    scores: ScoresConfig = Field(
        default_factory=ScoresConfig,
        description="Per-image score columns (CLIP score, brightness, sharpness, classifiers).",
    )
    upscale: UpscaleConfig = Field(
        default_factory=UpscaleConfig,
        description="KandiSuperRes upscaling: after generation (`upscale.model` set on a "
        "`text_to_image` job), or the whole of a `job: upscale`.",
    )

    @model_validator(mode="after")
    def _beautify_source(self) -> JobConfig:
        if self.job == "beautify" and not self.beautify.enabled:
            raise ValueError("job=beautify needs beautify.enabled: true")
        if self.beautify.enabled and self.input.beautified_prompt_column:
            raise ValueError(
                "input.beautified_prompt_column reads prompts beautified earlier; it cannot be "
                "combined with beautify.enabled (which runs the LLM again)"
            )
        if self.job == "beautify" and self.scores.enabled:
            raise ValueError("scores.enabled scores images: job=beautify makes none")
        return self

    @model_validator(mode="after")
    def _upscale(self) -> JobConfig:
        if self.job == "upscale":
            if not self.upscale.enabled:
                raise ValueError("job=upscale needs upscale.model (x4, x2 or flash-x2)")
            if self.beautify.enabled or self.scores.enabled:
                on = "beautify.enabled" if self.beautify.enabled else "scores.enabled"
                raise ValueError(f"{on}: job=upscale upscales images only; remove it")
        elif self.job == "beautify" and self.upscale.enabled:
            raise ValueError("upscale.model: job=beautify makes no images to upscale")
        return self

    @model_validator(mode="after")
    def _model_settings(self) -> JobConfig:
        """Model-specific checks, then null generation defaults become the model's own."""
        apply_member_defaults(self.generation, self.model)
        from k3batch.model import family

        why = family.of(self.model.name).no_text_encoder_pool
        if why and self.resources.text_encoder_pool.enabled:
            raise ValueError(
                f"resources.text_encoder_pool: {self.model.name}{why}; disable the pool"
            )
        return self

    @model_validator(mode="after")
    def _sizes_within_limits(self) -> JobConfig:
        g, lim = self.generation, self.limits
        for name in ("width", "height"):
            if getattr(g, name) > lim.max_side:
                raise ValueError(
                    f"generation.{name}={getattr(g, name)} is above limits.max_side={lim.max_side}"
                )
        if g.num_inference_steps > lim.max_num_inference_steps:
            raise ValueError(
                f"generation.num_inference_steps={g.num_inference_steps} is above "
                f"limits.max_num_inference_steps={lim.max_num_inference_steps}"
            )
        if g.num_images_per_prompt > lim.max_num_images_per_prompt:
            raise ValueError(
                f"generation.num_images_per_prompt={g.num_images_per_prompt} is above "
                f"limits.max_num_images_per_prompt={lim.max_num_images_per_prompt}"
            )
        return self
