"""Configuration of the Serve application (the `args` of a Serve config's application)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from k3batch.config import (
    GenerationConfig,
    LimitsConfig,
    ModelConfig,
    Strict,
    apply_member_defaults,
)


class BatchingConfig(Strict):
    max_batch_size: int = Field(
        4,
        ge=1,
        description="Most images per UNet call; concurrent requests are batched up to this.",
    )
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a batch waits for more requests before it runs."
    )


class GeneratorDeploymentConfig(Strict):
    num_replicas: int | None = Field(
        1, ge=1, description="Fixed replica count; null when `autoscaling_config` is set."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None,
        description="Ray Serve autoscaling settings (min_replicas, max_replicas, "
        "target_ongoing_requests, ...); replaces num_replicas.",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generator replica.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per generator replica.")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests a replica holds at once (must be >= max_batch_size)."
    )
    max_queued_requests: int = Field(
        32,
        ge=1,
        description="Requests waiting for a replica before new ones are refused with 429 and "
        "Retry-After: the bound that keeps overload from queueing forever.",
    )
    decode_batch_size: int = Field(1, ge=1, description="Latents per MoVQ decode call.")


class ServeLimits(LimitsConfig):
    max_n: int = Field(4, ge=1, description="Largest `n` (images per request).")
    max_request_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body; larger ones get 413."
    )


class AuthConfig(Strict):
    api_keys_env: str | None = Field(
        None,
        description="Environment variable holding accepted bearer tokens, comma-separated. "
        "Keys are never logged.",
    )
    api_keys_file: str | None = Field(
        None, description="File with one accepted bearer token per line."
    )


class ServeAppConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to serve.")
    served_model_name: str = Field(
        "kandinsky3", description="The name clients pass as `model` and /v1/models lists."
    )
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(seed=-1),
        description="Defaults for requests; `seed: -1` gives each image a random seed unless "
        "the request sets one.",
    )
    limits: ServeLimits = Field(default_factory=ServeLimits, description="Request limits.")
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig, description="Dynamic batching."
    )
    generator: GeneratorDeploymentConfig = Field(
        default_factory=GeneratorDeploymentConfig, description="The generator deployment."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="A request not answered in this time gets 503 with Retry-After."
    )
    retry_after_s: int = Field(
        5, ge=1, description="Seconds in the Retry-After header of 429/503 answers."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Optional API keys.")
    output_uri: str | None = Field(
        None,
        description="Where `response_format: url` stores images (local path or fsspec URI); "
        "without it only b64_json is offered.",
    )

    @model_validator(mode="after")
    def _replicas(self) -> ServeAppConfig:
        apply_member_defaults(self.generation, self.model)
        g = self.generator
        if g.autoscaling_config is not None:
            g.num_replicas = None
        if g.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"generator.max_ongoing_requests ({g.max_ongoing_requests}) must be >= "
                f"batching.max_batch_size ({self.batching.max_batch_size})"
            )
        return self
