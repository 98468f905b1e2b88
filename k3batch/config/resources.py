"""`resources:`: batching and the actor pools' sizes and requests."""

from __future__ import annotations

from pydantic import Field, model_validator

from k3batch.config.base import Strict


class TextEncoderPoolConfig(Strict):
    """The T5 text encoder in its own actor pool, ahead of the generation pool."""

    enabled: bool = Field(
        False,
        description="Run the text encoder in its own actor pool: it adds per-row prompt "
        "embeddings (`prompt_embeds`, `negative_prompt_embeds`) that the generation actors "
        "read, and those actors load no T5 (8.7B parameters, 17 GB in bfloat16). Images equal "
        "those of the in-actor encoder. Use it when encoding holds up the UNet, or to fit the "
        "UNet actors in less memory.",
    )
    num_actors: int = Field(1, ge=1, description="Text encoder actors to start.")
    max_actors: int | None = Field(
        None, ge=1, description="Upper bound for autoscaling the pool; null = num_actors."
    )
    num_gpus_per_actor: float = Field(
        0.0,
        ge=0,
        description="GPUs per text encoder actor; fractions share a GPU (e.g. 0.5: two "
        "encoders per GPU, or one beside a generation actor that asks for 0.5).",
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per text encoder actor.")
    batch_size: int = Field(
        32, ge=1, description="Rows per text encoder call (with their negative prompts)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> TextEncoderPoolConfig:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(
                f"max_actors ({self.max_actors}) must be >= num_actors ({self.num_actors})"
            )
        return self


class ResourcesConfig(Strict):
    batch_size: int = Field(
        4,
        ge=1,
        description="Rows per generation call. Rows of different size or step count "
        "are split into separate forward passes within a batch.",
    )
    num_actors: int = Field(1, ge=1, description="Generation actors to start (one model each).")
    max_actors: int | None = Field(
        None,
        ge=1,
        description="Upper bound for autoscaling the generation pool; null = num_actors.",
    )
    num_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs per generation actor (0 on CPU-only machines)."
    )
    num_cpus_per_actor: float = Field(
        1.0,
        gt=0,
        description="CPUs per generation actor; Ray also sets the actor's torch thread count from it.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per generation actor; null = Ray's default (the actor's CPU "
        "request, rounded down). On CPU-only machines set it to the cores the model may use, "
        "above the CPU request, so the light CPU stages can still be scheduled beside it.",
    )
    decode_batch_size: int = Field(
        1,
        ge=1,
        description="Latents per MoVQ decode call, at most: a call that runs out of GPU memory "
        "is retried with half as many (and later calls keep the smaller size). 1 keeps decode "
        "memory flat and results batch-independent.",
    )
    write_num_cpus: float = Field(0.5, gt=0, description="CPUs per image encode/write task.")
    text_encoder_pool: TextEncoderPoolConfig = Field(
        default_factory=TextEncoderPoolConfig,
        description="Optional separate actor pool for the T5 text encoder.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ResourcesConfig:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(
                f"max_actors ({self.max_actors}) must be >= num_actors ({self.num_actors})"
            )
        return self


# Option names that carry secrets in fsspec/s3fs/gcsfs/adlfs storage options.
