"""Configuration of the Serve application (the `args` of a Serve config's application)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from k3batch.beautify.config import SamplingConfig
from k3batch.beautify.prompt import DEFAULT_SYSTEM_PROMPT
from k3batch.config import (
    GenerationConfig,
    LimitsConfig,
    ModelConfig,
    Strict,
    apply_member_defaults,
)
from k3batch.config.upscale import UpscaleConfig


class BatchingConfig(Strict):
    max_batch_size: int = Field(
        4,
        ge=1,
        description="Most images per UNet call; concurrent requests are batched up to this.",
    )
    batch_wait_timeout_s: float = Field(
        0.05, ge=0, description="How long a batch waits for more requests before it runs."
    )


class DeploymentConfig(Strict):
    num_replicas: int | None = Field(
        1, ge=1, description="Fixed replica count; null when `autoscaling_config` is set."
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None,
        description="Ray Serve autoscaling settings (min_replicas, max_replicas, "
        "target_ongoing_requests, ...); replaces num_replicas.",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests a replica holds at once (must be >= max_batch_size)."
    )
    max_queued_requests: int = Field(
        32,
        ge=1,
        description="Requests waiting for a replica before new ones are refused with 429 and "
        "Retry-After: the bound that keeps overload from queueing forever.",
    )


class GeneratorDeploymentConfig(DeploymentConfig):
    decode_batch_size: int = Field(1, ge=1, description="Latents per MoVQ decode call.")


class ServeLimits(LimitsConfig):
    max_n: int = Field(4, ge=1, description="Largest `n` (images per request).")
    max_request_bytes: int = Field(
        1_000_000, ge=1024, description="Largest JSON request body; larger ones get 413."
    )
    max_upload_bytes: int = Field(
        20_000_000,
        ge=1024,
        description="Largest multipart body of /v1/images/edits (image + mask); larger ones "
        "get 413.",
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


class ServeBeautifyConfig(Strict):
    """Prompt beautification for requests with `beautify: true`, by an OpenAI-compatible LLM
    server: `vllm serve`, a `ray.serve.llm` application (`build_openai_app`) in the same Serve
    config, or a hosted API. A `Beautifier` deployment sends the requests."""

    base_url: str = Field(
        description="API root of the LLM server, e.g. http://127.0.0.1:8000/llm/v1 for a "
        "ray.serve.llm app at route_prefix /llm."
    )
    model: str = Field("Intel/neural-chat-7b-v3-1", description="Model name the LLM server serves.")
    api: Literal["chat", "completions"] = Field(
        "chat",
        description="`chat`: /chat/completions with the server's chat template (give vllm "
        "the one from `k3batch chat-template`); `completions`: k3batch formats the prompt.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the LLM server's API key; null = none."
    )
    system_prompt: str = Field(
        DEFAULT_SYSTEM_PROMPT, description="System prompt of the Kandinsky 3.1 format."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="Sampling parameters; a request's seed (when it sets one) seeds the LLM, "
        "so the same request gets the same revised prompt.",
    )
    on_too_long: Literal["truncate", "original"] = Field(
        "truncate",
        description="A beautified prompt above the text encoder's tokens (T5: 128; "
        "Kandinsky 2.2's CLIP: 77) is cut (`truncate`) or the original prompt is used "
        "(`original`).",
    )
    on_error: Literal["original", "fail"] = Field(
        "original",
        description="When the LLM fails or answers nothing: generate from the original "
        "prompt (`revised_prompt` null), or answer 503 with Retry-After (`fail`).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Time limit of one LLM request.")
    max_retries: int = Field(
        1, ge=0, description="Retries after a connection error, timeout or HTTP 408/429/5xx."
    )
    retry_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles.")
    num_replicas: int = Field(1, ge=1, description="Beautifier deployment replicas.")
    num_cpus: float = Field(0.1, gt=0, description="CPUs per beautifier replica (it waits).")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Beautify requests a replica keeps open at once."
    )


class ServeAppConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to serve.")
    served_model_name: str = Field(
        "kandinsky3",
        description="The name clients pass as `model` and /v1/models lists; a Kandinsky 2.2 "
        "model's own member name (e.g. `kandinsky2.2`) unless set.",
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
    inpaint_model: ModelConfig | None = Field(
        None,
        description="Inpainting model (`name: kandinsky3-inpaint` or `kandinsky2.2-inpaint`) "
        "behind /v1/images/edits; null: the endpoint answers 404.",
    )
    inpaint_served_model_name: str = Field(
        "kandinsky3-inpaint",
        description="The name clients pass as `model` to /v1/images/edits; a Kandinsky 2.2 "
        "model's own member name (`kandinsky2.2-inpaint`) unless set.",
    )
    inpaint_generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(seed=-1),
        description="Defaults for edits requests (null steps/guidance: the inpainting "
        "model's own, 50 and 4.0 for Kandinsky 3); the size follows the uploaded image.",
    )
    inpaint_generator: GeneratorDeploymentConfig = Field(
        default_factory=GeneratorDeploymentConfig,
        description="The inpainting generator deployment.",
    )
    beautify: ServeBeautifyConfig | None = Field(
        None, description="Prompt beautification; null: `beautify: true` answers 400."
    )
    upscale: UpscaleConfig | None = Field(
        None,
        description="KandiSuperRes behind /v1/images/upscale (a k3batch extension of the "
        "Images API); its `batch_size` is the most images per upscaling call, and its pool "
        "fields are unused (see `upscaler`). null: the endpoint answers 404.",
    )
    upscale_served_model_name: str | None = Field(
        None,
        description="The name clients pass as `model` to /v1/images/upscale; null: "
        "`kandisuperres-<upscale.model>`.",
    )
    upscaler: DeploymentConfig = Field(
        default_factory=DeploymentConfig, description="The upscaler deployment."
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
        from k3batch.model import family

        apply_member_defaults(self.generation, self.model)
        for section in ("generation", "inpaint_generation"):
            if getattr(self, section).num_images_per_prompt != 1:
                # A request's `n` says how many images it wants (seed, seed + 1, ...).
                raise ValueError(
                    f"{section}.num_images_per_prompt: a request's `n` sets the images per "
                    f"request; remove it (got {getattr(self, section).num_images_per_prompt})"
                )
        # /v1/images/generations serves a member that needs no image (a depth member's
        # `hint` comes in the request's body, as the Kandinsky 3 ControlNet's edge hint);
        # /v1/images/edits one that repaints an image under a mask.
        member = family.MEMBERS[self.model.name]
        if member.needs_mask:
            raise ValueError(
                f"model.name: {self.model.name} needs an image and a mask; configure it as "
                "inpaint_model (served at /v1/images/edits)"
            )
        # A 2.2 member is asked for by its own name unless the config names it otherwise.
        by_name = family.of(member.name).served_by_member_name
        if by_name and "served_model_name" not in self.model_fields_set:
            self.served_model_name = member.name
        deployments = [("generator", self.generator)]
        if self.inpaint_model is not None:
            if not family.MEMBERS[self.inpaint_model.name].needs_mask:
                masked = " or ".join(family.members_with(needs_mask=True))
                raise ValueError(
                    f"inpaint_model.name: must be {masked}, got {self.inpaint_model.name!r}"
                )
            apply_member_defaults(self.inpaint_generation, self.inpaint_model)
            inpaint = family.MEMBERS[self.inpaint_model.name]
            if (
                family.of(inpaint.name).served_by_member_name
                and "inpaint_served_model_name" not in self.model_fields_set
            ):
                self.inpaint_served_model_name = inpaint.name
            deployments.append(("inpaint_generator", self.inpaint_generator))
        if self.upscale is not None:
            if self.upscale.model is None:
                raise ValueError("upscale.model: set x4, x2 or flash-x2 (or upscale: null)")
            if self.upscale_served_model_name is None:
                self.upscale_served_model_name = f"kandisuperres-{self.upscale.model}"
            if self.upscaler.autoscaling_config is not None:
                self.upscaler.num_replicas = None
        for name, g in deployments:
            if g.autoscaling_config is not None:
                g.num_replicas = None
            if g.max_ongoing_requests < self.batching.max_batch_size:
                raise ValueError(
                    f"{name}.max_ongoing_requests ({g.max_ongoing_requests}) must be >= "
                    f"batching.max_batch_size ({self.batching.max_batch_size})"
                )
        return self
