"""Job configuration: one YAML file, validated by pydantic, every field described."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from k3batch.beautify.config import BeautifyConfig

Dtype = Literal["float32", "float16", "bfloat16"]


class ConfigError(ValueError):
    """A bad config: the message is one line naming the field and the value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class InputConfig(Strict):
    uri: str = Field(
        description="Parquet file or directory of Parquet files: a local path or any fsspec URI "
        "(s3://bucket/prompts/, gs://...)."
    )
    prompt_column: str = Field("prompt", description="Column holding the text prompt.")
    id_column: str = Field(
        "id",
        description="Column holding a stable row id. When the table has no such column, ids are "
        "derived from the source file and row position, so a rerun gives the same ids.",
    )
    beautified_prompt_column: str | None = Field(
        None,
        description="Column of already beautified prompts (e.g. `beautified_prompt` written by "
        "a beautify-only job): generation uses it, and the original prompt where it is empty; "
        "the LLM does not run. null: none (or beautify.enabled runs the LLM).",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str) -> str:
        return _no_userinfo(v)


class DtypeMap(Strict):
    """Per-component dtypes, as the `dtype_map` of the Kandinsky 3 README."""

    unet: Dtype = Field("float32", description="UNet weights and activations.")
    text_encoder: Dtype = Field(
        "float16", description="T5 (Flan-UL2) encoder; the reference runs it in float16."
    )
    movq: Dtype = Field("float32", description="MoVQ decoder.")


class CompileConfig(Strict):
    """`torch.compile` of the denoising UNet(s) and the MoVQ decoder (off by default)."""

    unet: bool = Field(
        False,
        description="Compile the UNet(s) (every member the job loads). The first batch of each "
        "new shape (size, batch) compiles, which takes minutes at 1024x1024.",
    )
    movq: bool = Field(
        False,
        description="Compile the MoVQ decoder: worth it for Flash, where decoding is ~70% of "
        "the work.",
    )
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        Field("default", description="torch.compile `mode`.")
    )
    backend: str = Field("inductor", description="torch.compile `backend`.")
    fullgraph: bool = Field(
        False, description="torch.compile `fullgraph`: fail on graph breaks instead of splitting."
    )
    dynamic: bool | None = Field(
        None,
        description="torch.compile `dynamic`; null: recompile once with dynamic shapes when a "
        "shape changes (e.g. a smaller last batch).",
    )
    warmup: bool = Field(
        True,
        description="Compile when the actor starts, on one batch of `resources.batch_size` "
        "rows at `generation`'s size, instead of on the first real batch (the 3B UNet takes "
        "over 3 minutes to compile on an H200 host; measured in benchmarks/RESULTS.md).",
    )
    cache_dir: str | None = Field(
        None,
        description="Directory for torch.compile's caches (Inductor's and Triton's kernels): "
        "actors that share it (one node, or a shared filesystem) compile once and load the "
        "rest from it. null: torch's default, a per-user folder under /tmp.",
    )


class PerformanceConfig(Strict):
    """Speed settings that keep each image equal to the plain path up to float rounding."""

    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel of every attention layer (UNet, its attention pooling, "
        "MoVQ, T5). `sdpa`: torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0; "
        "flash / memory-efficient kernels on GPUs, no 16384x16384 score matrix in the MoVQ "
        "decoder at 1024x1024). `eager`: diffusers' AttnProcessor, scores materialised.",
    )
    channels_last: bool = Field(
        False,
        description="Convolution weights and activations of the UNet(s) and MoVQ in "
        "torch.channels_last memory format (faster convolutions in half precision on GPUs).",
    )
    compile: CompileConfig = Field(
        default_factory=CompileConfig, description="torch.compile settings."
    )
    tf32: bool = Field(
        True,
        description="float32 components on CUDA run matmuls and convolutions on TF32 tensor "
        "cores (torch's default is full float32 for matmuls, ~8x slower on an H100). "
        "`model.precision: reference` turns it off.",
    )


def _check_device(v: str) -> str:
    if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


class DeviceMap(Strict):
    """Per-component devices, as the `device_map` of the Kandinsky 3 README."""

    unet: str = Field("auto", description="Device of the UNet(s) and the sampler.")
    text_encoder: str = Field(
        "auto", description="Device of the T5 encoder (its projection runs with the UNet)."
    )
    movq: str = Field("auto", description="Device of the MoVQ encoder/decoder.")

    @field_validator("unet", "text_encoder", "movq")
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


# model.precision presets: dtype per component, and TF32 for float32 components on CUDA.
PRECISIONS = {
    "bfloat16": ({"unet": "bfloat16", "text_encoder": "bfloat16", "movq": "bfloat16"}, True),
    "reference": ({"unet": "float32", "text_encoder": "float16", "movq": "float32"}, False),
}


class ModelConfig(Strict):
    name: Literal["kandinsky3", "kandinsky3-flash", "kandinsky3-inpaint"] = Field(
        "kandinsky3",
        description="Family member. `kandinsky3`: base text-to-image (and image-to-image for "
        "rows with an `image`); `kandinsky3-flash`: Kandinsky 3.1 Flash, 4 fixed steps, no "
        "guidance; `kandinsky3-inpaint`: inpainting, rows carry `image` and `mask`.",
    )
    path: str = Field(
        "kandinsky-community/kandinsky-3",
        description="Checkpoint: a Hugging Face repo id or a local directory, in k3batch's "
        "diffusers family layout (tokenizer/, text_encoder/, movq/ and unet/, unet_flash/ or "
        "unet_inpaint/; `k3batch convert` writes it) or the reference layout of "
        "ai-forever/Kandinsky3.1 (weights/*.pt).",
    )
    layout: Literal["auto", "diffusers", "reference"] = Field(
        "auto",
        description="Weight layout of `path`; `auto` detects it (a local directory by its files, "
        "a repo id by whether it has weights/movq.pt).",
    )
    variant: str | None = Field(
        None,
        description="Weight file variant to load (diffusers layout), e.g. `fp16` for "
        "kandinsky-community/kandinsky-3.",
    )
    refine: bool = Field(
        False,
        description="Base jobs only: after sampling, run one Kandinsky 3.1 Flash step at t=229 on "
        "the latent (the 3.1 release's refiner). Loads the Flash UNet too; the T5 encoder "
        "is shared.",
    )
    make_tiny: bool = Field(
        False,
        description="Build a tiny random-weight checkpoint of the whole family at `path` (in "
        "`layout`, diffusers when auto) when none is there (demo and tests; never use for real "
        "images).",
    )
    precision: Literal["bfloat16", "reference"] | None = Field(
        None,
        description="A precision preset instead of `dtype`: `bfloat16` runs UNet, T5 and MoVQ "
        "in bfloat16 (the GPU configs; the sampler's state stays float32); `reference` is the "
        "reference's dtype_map (UNet and MoVQ float32, T5 float16) with TF32 off, for images "
        "faithful to ai-forever/Kandinsky-3. null: `dtype` as given.",
    )
    dtype: DtypeMap = Field(default_factory=DtypeMap, description="Dtype per component.")
    device: str | DeviceMap = Field(
        "auto",
        description="Torch device for all components (`auto`: CUDA when the actor has a GPU, "
        "else CPU; `cpu`, `cuda` or `cuda:N`), or a mapping per component "
        "{unet, text_encoder, movq}.",
    )
    performance: PerformanceConfig = Field(
        default_factory=PerformanceConfig,
        description="Attention kernel, memory format and torch.compile (the GPU path).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        return _check_device(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _apply_precision(self):
        if self.precision is None:
            return self
        dtypes, tf32 = PRECISIONS[self.precision]
        # A dump of this config carries both; only a different explicit dtype map conflicts.
        if "dtype" in self.model_fields_set and self.dtype.model_dump() != dtypes:
            raise ValueError(
                f"model.precision: {self.precision!r} sets every component's dtype; drop "
                "model.dtype, or drop model.precision to set dtypes one by one"
            )
        # Assigned past validation: the preset is the effective dtype map stages read.
        object.__setattr__(self, "dtype", DtypeMap(**dtypes))
        if "tf32" not in self.performance.model_fields_set:
            object.__setattr__(self.performance, "tf32", tf32)
        return self

    def device_map(self) -> dict[str, str]:
        if isinstance(self.device, str):
            return {c: self.device for c in ("unet", "text_encoder", "movq")}
        return self.device.model_dump()


def _multiple_of_64(v: int) -> int:
    if v <= 0 or v % 64:
        raise ValueError("must be a positive multiple of 64")
    return v


class GenerationConfig(Strict):
    """Defaults for every row; optional input columns of the same names override them."""

    num_inference_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Denoising steps (reference spacing range(999, 0, -1000//steps)); null = "
        "the model's default (50). Flash always runs its 4 fixed steps.",
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Classifier-free guidance weight w in (w+1)*cond - w*uncond; null = the "
        "model's default (3.0 base, 4.0 inpainting). Flash uses no guidance.",
    )
    strength: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Image-to-image rows (base model, rows with an `image`): how far the input "
        "is noised; the last int(steps * strength) timesteps run (diffusers' rule and "
        "default). Near 0 returns the input, 1 ignores it.",
    )
    width: int = Field(1024, description="Image width in pixels, a multiple of 64.")
    height: int = Field(1024, description="Image height in pixels, a multiple of 64.")
    negative_prompt: str | None = Field(
        None, description="Negative prompt for rows without their own; null for none."
    )
    seed: int = Field(
        0,
        ge=-1,
        lt=2**63,
        description="Base seed. A row without its own `seed` gets one derived from this and its "
        "id; -1 picks a random seed per row. The seed used is recorded per row.",
    )

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int) -> int:
        return _multiple_of_64(v)

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class LimitsConfig(Strict):
    max_side: int = Field(2048, ge=64, description="Largest allowed width or height of a row.")
    max_num_inference_steps: int = Field(
        1000, ge=1, le=1000, description="Largest allowed num_inference_steps of a row."
    )
    max_prompt_chars: int = Field(
        20000,
        ge=1,
        description="Longest allowed prompt in characters (the text encoder reads 128 tokens "
        "anyway; this guards the tokenizer against absurd rows).",
    )


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
_SECRET_OPTION = re.compile(
    r"secret|password|token|credential|sas|account_key|^key$|access_key", re.I
)


class SecretInValue(ValueError):
    """A value that holds a credential: its error message never repeats the value."""


def _no_userinfo(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        raise SecretInValue(
            f"must not carry credentials (user:password@host), got {scheme}://***@...; "
            "give them through the environment or storage.profile"
        )
    return uri


def _secret_keys(options: Any, path: str = "") -> list[str]:
    if not isinstance(options, dict):
        return []
    found = []
    for key, value in options.items():
        name = f"{path}{key}"
        if _SECRET_OPTION.search(str(key)):
            found.append(name)
        found += _secret_keys(value, f"{name}.")
    return found


class StorageConfig(Strict):
    """How every input and output URI is reached (fsspec; s3:// through s3fs).

    Holds no secrets: credentials come from the environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, instance roles) or a named profile, on the
    driver and on every Ray worker alike.
    """

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for s3:// URIs (MinIO, SeaweedFS, R2, Ceph), e.g. "
        "http://127.0.0.1:9000. null: AWS, or AWS_ENDPOINT_URL when set.",
    )
    region: str | None = Field(
        None, description="S3 region for s3:// URIs; null: the profile's or environment's."
    )
    profile: str | None = Field(
        None,
        description="Named profile from ~/.aws/credentials or ~/.aws/config (the file must "
        "exist on every Ray node). null: environment credentials or an instance role.",
    )
    anonymous: bool = Field(False, description="Read public s3:// buckets without credentials.")
    max_attempts: int = Field(
        10,
        ge=1,
        le=100,
        description="Attempts per s3:// request, the first included (botocore's retries, "
        "exponential backoff with jitter, at most 20 s apart): a store that is unreachable, "
        "throttling or answering 5xx for a few seconds costs retries, not rows. A write that "
        "still fails stops the job with a storage error; rerunning it resumes. 1: no retries.",
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard",
        description="botocore retry mode for s3:// requests: `standard`, or `adaptive` "
        "(standard plus client-side rate limiting when the store throttles).",
    )
    connect_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds to wait for a connection to the s3:// endpoint before the attempt "
        "counts as failed (botocore's default is 60).",
    )
    read_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait for an s3:// response before the attempt fails."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec storage options for every URI's filesystem (any protocol), "
        "e.g. {requester_pays: true} for s3 or {project: my-project} for gs. Secrets are refused "
        "here: they would be written into run.json.",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "@" in v.split("://", 1)[-1].split("/", 1)[0]:
            raise SecretInValue(
                "must not carry credentials (user:password@host); give them through the "
                "environment or storage.profile"
            )
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        secret = _secret_keys(v)
        if secret:
            raise ValueError(
                f"{', '.join(secret)} look like credentials; keep secrets out of the config "
                "(environment variables or storage.profile)"
            )
        return v


class OutputConfig(Strict):
    uri: str = Field(
        description="Output directory: a local path or an fsspec URI (s3://bucket/run/)."
    )
    format: Literal["files", "webdataset"] = Field(
        "files",
        description="`files`: images/<key>.<ext> plus metadata/*.parquet (and images/metadata.parquet, "
        "so the folder loads as a Hugging Face image folder). `webdataset`: tar shards "
        "shards/00000.tar ... holding <key>.<ext>, <key>.txt (prompt) and <key>.json (metadata), "
        "each with a Parquet index shards/00000.parquet of all its rows (img2dataset's layout).",
    )
    shard_size: int = Field(
        256,
        ge=1,
        description="Rows per webdataset shard (a target: a shard holds whole generation batches, "
        "and the last one of a run may be smaller). Ignored by `files`.",
    )
    rows_per_file: int = Field(
        256,
        ge=1,
        description="Rows per metadata file under metadata/, at least (`files` only; the last "
        "file of a run may hold fewer): Ray Data gathers the rows of several batches into one "
        "Parquet file, so a table of millions of rows leaves thousands of files, not one per "
        "batch. A row counts as finished for resume once its file is written: a run stopped "
        "part-way generates the rows of unwritten files again, up to about this many.",
    )
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality (ignored for PNG).")
    overwrite: bool = Field(
        False,
        description="Replace a previous run found in `uri`. Without it, a rerun of the same job "
        "resumes (only rows without finished output are generated) and a different job into a "
        "used output is refused (`k3batch run --overwrite` sets this).",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str) -> str:
        return _no_userinfo(v)


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


def apply_member_defaults(generation: GenerationConfig, model: ModelConfig) -> None:
    """Fill null steps/guidance with the family member's own; refuse settings it cannot use.

    Shared by batch jobs and the Serve app, so both treat a member the same way.
    """
    from k3batch.model import family

    g, m = generation, model
    member = family.MEMBERS[m.name]
    if m.refine and m.name != family.BASE:
        raise ValueError(f"model.refine: works on kandinsky3 (base) jobs, not {m.name}")
    if m.name == family.FLASH:
        # Flash has no guidance and fixed timesteps: settings that would not be used are
        # reported here rather than silently dropped.
        if g.negative_prompt is not None:
            raise ValueError(
                f"generation.negative_prompt: kandinsky3-flash uses no guidance, so a "
                f"negative prompt has no effect (got {g.negative_prompt!r}); remove it"
            )
        if g.guidance_scale is not None:
            raise ValueError(
                f"generation.guidance_scale: kandinsky3-flash uses no guidance "
                f"(got {g.guidance_scale!r}); remove it"
            )
        if g.num_inference_steps not in (None, len(family.FLASH_TIMESTEPS)):
            raise ValueError(
                f"generation.num_inference_steps: kandinsky3-flash always runs 4 steps at "
                f"{list(family.FLASH_TIMESTEPS)} (got {g.num_inference_steps!r}); remove it"
            )
        g.num_inference_steps = len(family.FLASH_TIMESTEPS)
    else:
        if g.num_inference_steps is None:
            g.num_inference_steps = member.num_inference_steps
        if g.guidance_scale is None:
            g.guidance_scale = member.guidance_scale


class JobConfig(Strict):
    job: Literal["text_to_image", "beautify"] = Field(
        "text_to_image",
        description="`text_to_image`: prompts to images and metadata. `beautify`: prompts to a "
        "prompt table with `beautified_prompt` (no diffusion model; needs beautify.enabled).",
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

    @model_validator(mode="after")
    def _beautify_source(self) -> JobConfig:
        if self.job == "beautify" and not self.beautify.enabled:
            raise ValueError("job=beautify needs beautify.enabled: true")
        if self.beautify.enabled and self.input.beautified_prompt_column:
            raise ValueError(
                "input.beautified_prompt_column reads prompts beautified earlier; it cannot be "
                "combined with beautify.enabled (which runs the LLM again)"
            )
        return self

    @model_validator(mode="after")
    def _model_settings(self) -> JobConfig:
        """Model-specific checks, then null generation defaults become the model's own."""
        apply_member_defaults(self.generation, self.model)
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
        return self


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    return out


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        hidden = isinstance((e.get("ctx") or {}).get("error"), SecretInValue)
        shown = (
            ""
            if hidden or isinstance(value, dict) or e["type"] == "missing"
            else f" (got {value!r})"
        )
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}")
    return "; ".join(parts)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None
) -> JobConfig:
    """Read YAML, apply `--set key.path=value` overrides, validate. Raises ConfigError."""
    if data is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"config error: {format_validation_error(e)}") from None
