"""`model:`: which member, from where, on which devices, at which precision and speed settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from k3batch.config.base import Dtype, Strict
from k3batch.model import family


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


class LoraConfig(Strict):
    """One LoRA fused into the job's member UNet at load (see docs/models-and-numerics.md)."""

    path: str = Field(
        description="A LoRA safetensors file (a local path every worker can read): the "
        "ai-forever/kandinsky3-diffusers fork's `LoraKandi3AttnProcessor` weights, or "
        "diffusers' / PEFT's LoRA keys on `Kandinsky3UNet` (`lora_A`/`lora_B` or "
        "`lora.down`/`lora.up`, optional `.alpha`). Every key must match a UNet weight of its "
        "shape, or the job fails before it starts."
    )
    scale: float = Field(
        1.0,
        allow_inf_nan=False,
        description="Weight of this LoRA: W += scale * alpha / rank * up @ down. 0 leaves "
        "the UNet as it is; several LoRAs add up.",
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
    name: Literal[family.NAMES] = Field(
        family.BASE,
        description="Family member. "
        + "; ".join(f"`{m.name}`: {m.summary}" for m in family.MEMBERS.values())
        + ".",
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
    lora: list[LoraConfig] = Field(
        default_factory=list,
        description="LoRAs fused into the weights of the UNet of `name` when the model "
        "loads (no per-step cost), in order, each with its scale. Only that UNet: the Flash "
        "refiner of `refine` keeps its weights, and a LoRA trained for the base UNet fits "
        "Flash or inpainting only if every shape matches (checked at load).",
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
