"""`model:`: which member, from where, on which devices, at which precision and speed settings."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from k3batch.config.base import Dtype, Strict
from k3batch.config.performance import PerformanceConfig
from k3batch.model import family
from k3batch.model.kandinsky22 import members as k22_members


class DtypeMap(Strict):
    """Per-component dtypes, as the `dtype_map` of the Kandinsky 3 README."""

    unet: Dtype = Field(
        "float32", description="UNet weights and activations (Kandinsky 2.2: the decoder's UNet)."
    )
    text_encoder: Dtype = Field(
        "float16",
        description="Kandinsky 3: the T5 (Flan-UL2) encoder; the reference runs it in float16. "
        "Kandinsky 2.2: the prior's CLIP text tower (float16 too, as diffusers' examples load "
        "the prior; set float32 on a CPU).",
    )
    movq: Dtype = Field("float32", description="MoVQ decoder.")
    prior: Dtype = Field(
        "float32", description="Kandinsky 2.2 only: the prior transformer (PriorTransformer)."
    )
    image_encoder: Dtype = Field(
        "float32",
        description="Kandinsky 2.2 only: the prior's CLIP image encoder (image-to-image "
        "embeddings, image mixing).",
    )
    depth_estimator: Dtype = Field(
        "float32",
        description="Kandinsky 2.2 ControlNet depth only: the `model.depth_estimator` (DPT).",
    )


def _changed(section, names) -> list[str]:
    """The fields among `names` set to other than their defaults: a dumped config (Serve
    replicas validate the app's dump) spells out every default and must validate again."""
    fields = type(section).model_fields
    return [
        n
        for n in names
        if n in section.model_fields_set and getattr(section, n) != fields[n].default
    ]


# Every per-component dtype/device key a family loads (its `Family.components`), in order.
COMPONENTS = tuple(dict.fromkeys(c for f in family.FAMILIES.values() for c in f.components))
CORE_COMPONENTS = ("unet", "text_encoder", "movq")  # what every family loads


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


class IPAdapterConfig(Strict):
    """The Kandinsky 3 IP-Adapter of the base member: image prompts (see docs/ip-adapter.md)."""

    path: str | None = Field(
        None,
        description="The adapter's weights in the layout of the ai-forever/kandinsky3-diffusers "
        "fork (`image_proj`, `image_norm` and `to_key_ip`/`to_v_ip`/`to_out_ip` of each "
        "cross-attention processor): a safetensors file, a tensors-only pickle of the fork's "
        "UNet, or a folder holding `ip_adapter.safetensors`. The public weights were "
        "withdrawn: give a copy. null: the tiny set's `<model.path>/ip_adapter` (with "
        "`model.make_tiny` only).",
    )
    image_encoder: str | None = Field(
        None,
        description="The CLIP image encoder (a transformers `CLIPVisionModelWithProjection` "
        "with its `CLIPImageProcessor`: a folder or Hub id) whose image embeddings the adapter "
        "takes; it runs in the UNet's dtype on the UNet's device. null: "
        "`openai/clip-vit-large-patch14` (768-d, what the fork's adapter takes), or the tiny "
        "set's `<model.path>/ip_adapter/image_encoder` with `model.make_tiny`.",
    )


def _check_device(v: str) -> str:
    if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


class DeviceMap(Strict):
    """Per-component devices, as the `device_map` of the Kandinsky 3 README."""

    unet: str = Field("auto", description="Device of the UNet(s) and the sampler.")
    text_encoder: str = Field(
        "auto",
        description="Device of the T5 encoder (its projection runs with the UNet); Kandinsky "
        "2.2: of the prior's CLIP text tower.",
    )
    movq: str = Field("auto", description="Device of the MoVQ encoder/decoder.")
    prior: str = Field("auto", description="Kandinsky 2.2 only: device of the prior transformer.")
    image_encoder: str = Field(
        "auto", description="Kandinsky 2.2 only: device of the prior's CLIP image encoder."
    )
    depth_estimator: str = Field(
        "auto", description="Kandinsky 2.2 ControlNet depth only: device of the DPT estimator."
    )

    @field_validator(*COMPONENTS)
    @classmethod
    def _device(cls, v: str) -> str:
        return _check_device(v)


# model.precision presets: dtype per component, and TF32 for float32 components on CUDA.
# Components beside the UNet, T5 and MoVQ (Kandinsky 2.2's prior, image encoder and depth
# estimator) follow the UNet's dtype.
PRECISIONS = {
    "bfloat16": (dict.fromkeys(COMPONENTS, "bfloat16"), True),
    "reference": (dict.fromkeys(COMPONENTS, "float32") | {"text_encoder": "float16"}, False),
    # bfloat16, with the UNet's 1x1 convolutions and attention projections in FP8.
    "fp8": (dict.fromkeys(COMPONENTS, "bfloat16"), True),
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
        "ai-forever/Kandinsky3.1 (weights/*.pt). Kandinsky 2.2 members: the decoder's "
        "diffusers folder (unet/, movq/, scheduler/), by default the member's own Hub repo ("
        + ", ".join(f"`{m.default_path}`" for m in family.MEMBERS.values() if m.default_path)
        + "); with `make_tiny`, a directory holding the tiny set (`decoder/`, "
        "`decoder-inpaint/`, `controlnet-depth/`, `prior/`, `depth/`), whose member folder "
        "and prior are used.",
    )
    prior_path: str | None = Field(
        None,
        description="Kandinsky 2.2 only: the prior's diffusers folder or Hub repo (prior, "
        f"CLIP text and image encoders, tokenizer, scheduler); null: `{k22_members.PRIOR_REPO}` "
        "(`prior/` under `path` with `make_tiny`).",
    )
    depth_estimator: str | None = Field(
        None,
        description="Kandinsky 2.2 ControlNet depth only: a transformers depth model "
        "(`DPTForDepthEstimation` folder or Hub id, e.g. `Intel/dpt-large`) that estimates "
        "the `hint` of rows that bring an `image` but no `hint`. null: every row needs a "
        "`hint`. The tiny set of `make_tiny` has one at `<path>/depth`.",
    )
    controlnet: str | None = Field(
        None,
        description="Kandinsky 3 base only: a Kandinsky 3 ControlNet folder in the layout of "
        "`ai-forever/kandinsky3_controlnet_hed` (config.json + diffusion_pytorch_model.safetensors "
        "in the fork's names). Rows (and, on Serve, /v1/images/generations requests) may then "
        "bring a `hint` edge image (HED), with "
        "`controlnet_conditioning_scale` (default 1.0) and `control_guidance_start`/`_end` "
        "(default 0/1); rows without one are plain images. The tiny set of `make_tiny` has "
        "one at `<path>/controlnet_hed`.",
    )
    ip_adapter: IPAdapterConfig | None = Field(
        None,
        description="Kandinsky 3 base only: the IP-Adapter. Rows may then bring `ip_images`, "
        "a list of {image, weight} image prompts mixed by weight (image fusion), and "
        "`ip_adapter_scale` (default 1.0, the fork's `img_weight`); rows without them are "
        "plain images. `{}` with `make_tiny` uses the tiny set's adapter and image encoder.",
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
        "images). Kandinsky 2.2 members: the tiny 2.2 set (`decoder/`, `decoder-inpaint/`, "
        "`controlnet-depth/`, `prior/`, `depth/`) at `path`.",
    )
    precision: Literal["bfloat16", "reference", "fp8"] | None = Field(
        None,
        description="A precision preset instead of `dtype`: `bfloat16` runs UNet, T5 and MoVQ "
        "in bfloat16 (the GPU configs; the sampler's state stays float32); `reference` is the "
        "reference's dtype_map (UNet and MoVQ float32, T5 float16) with TF32 off, for images "
        "faithful to ai-forever/Kandinsky-3; `fp8` is `bfloat16` with the UNet's 1x1 "
        "convolutions and attention projections as FP8 matrix products "
        "(`performance.fp8`; opt-in, GPUs with FP8 tensor cores). Kandinsky 2.2's prior, "
        "image encoder and depth estimator follow the UNet. null: `dtype` as given.",
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
        given = self.dtype.model_fields_set
        if "dtype" in self.model_fields_set and any(
            getattr(self.dtype, k) != dtypes[k] for k in given
        ):
            raise ValueError(
                f"model.precision: {self.precision!r} sets every component's dtype; drop "
                "model.dtype, or drop model.precision to set dtypes one by one"
            )
        # Assigned past validation: the preset is the effective dtype map stages read.
        object.__setattr__(self, "dtype", DtypeMap(**dtypes))
        if "tf32" not in self.performance.model_fields_set:
            object.__setattr__(self.performance, "tf32", tf32)
        if self.precision == "fp8":
            if "fp8" in self.performance.model_fields_set and not self.performance.fp8:
                raise ValueError(
                    "model.performance.fp8: false contradicts model.precision: 'fp8'; drop one"
                )
            object.__setattr__(self.performance, "fp8", True)
        return self

    @model_validator(mode="after")
    def _member_settings(self):
        """What the member's family cannot do is refused naming the field (and its defaults,
        e.g. the member's own `path`, filled); another family's fields are refused."""
        member, own = family.MEMBERS[self.name], family.of(self.name)
        for name, what in (("controlnet", "ControlNet"), ("ip_adapter", "IP-Adapter")):
            if getattr(self, name) is not None and not member.conditioning:
                takers = ", ".join(family.members_with(conditioning=True))
                raise ValueError(
                    f"model.{name}: the Kandinsky 3 {what} works with {takers}, "
                    f"not {self.name}; remove it"
                )
        for other in family.FAMILIES.values():
            if other is own:
                continue
            set_here = [f"model.{f}" for f in other.model_fields if getattr(self, f)]
            foreign = [c for c in other.components if c not in own.components]
            if self.precision is None:  # a preset sets every key
                set_here += [f"model.dtype.{c}" for c in _changed(self.dtype, foreign)]
            if isinstance(self.device, DeviceMap):
                set_here += [f"model.device.{c}" for c in _changed(self.device, foreign)]
            if set_here:
                raise ValueError(
                    f"{set_here[0]}: only {other.title} members use it, not {self.name}; remove it"
                )
        own.check_model(self)
        return self

    def absolute_paths(self) -> None:
        """Make local paths absolute, in place: Ray workers and Serve replicas need not share
        the driver's working directory. With `make_tiny`, the folders it builds count as local."""

        def local(value):
            return value and (os.path.exists(value) or self.make_tiny)

        for name in ("path", "prior_path", "depth_estimator", "controlnet"):
            if local(getattr(self, name)):
                setattr(self, name, os.path.abspath(getattr(self, name)))
        for lora in self.lora:
            lora.path = os.path.abspath(lora.path)
        for name in ("path", "image_encoder"):
            value = self.ip_adapter and getattr(self.ip_adapter, name)
            if value and os.path.exists(value):  # else a Hub id (the encoder)
                setattr(self.ip_adapter, name, os.path.abspath(value))

    def device_map(self) -> dict[str, str]:
        """The device of each component the member's family loads."""
        components = family.of(self.name).components
        if isinstance(self.device, str):
            return {c: self.device for c in components}
        return {c: getattr(self.device, c) for c in components}
