"""Loading a stage's model once per actor, from the job's typed model settings
(`config.ModelConfig`): the generation and text-encoder stages share it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k3batch.config import ModelConfig


def is_kandinsky22(model: ModelConfig) -> bool:
    from k3batch.model import family

    return family.MEMBERS[model.name].family == family.KANDINSKY22


def ensure_tiny(model: ModelConfig) -> None:
    """Build the tiny checkpoint at `path` when the config asks for it (demo, tests)."""
    if model.make_tiny and is_kandinsky22(model):
        from k3batch.testing.tiny_k22 import make_tiny_k22

        make_tiny_k22(model.path)
    elif model.make_tiny:
        from k3batch.testing.tiny import make_tiny

        layout = "reference" if model.layout == "reference" else "diffusers"
        make_tiny(model.path, layout=layout)


def load_model(model: ModelConfig, decode_batch_size: int = 1, text_encoder: bool = True):
    """The pipeline `model` describes, Kandinsky 3 or 2.2 (builds the tiny one if asked).

    `text_encoder=False`: no T5; rows bring prompt embeddings from the text encoder pool.
    """
    ensure_tiny(model)
    if is_kandinsky22(model):
        from k3batch.model.kandinsky22.pipeline import Kandinsky22

        paths = model.kandinsky22_paths()
        return Kandinsky22.from_pretrained(
            paths["decoder"],
            member=model.name,
            prior_path=paths["prior"],
            depth_estimator=paths["depth_estimator"],
            dtype=model.dtype.model_dump(),
            device=model.device_map(),
            decode_batch_size=decode_batch_size,
            performance=model.performance.model_dump(),
        )
    from k3batch.model.kandinsky3.pipeline import Kandinsky3

    return Kandinsky3.from_pretrained(
        model.path,
        member=model.name,
        refine=model.refine,
        layout=model.layout,
        dtype=model.dtype.model_dump(),
        device=model.device_map(),
        variant=model.variant,
        decode_batch_size=decode_batch_size,
        performance=model.performance.model_dump(),
        text_encoder=text_encoder,
        lora=[(lora.path, lora.scale) for lora in model.lora],
        controlnet=model.controlnet,
        ip_adapter=model.ip_adapter_paths(),
    )


def model_components(pipe) -> dict:
    """The loaded modules by component name (for the device record)."""
    if hasattr(pipe, "components"):
        return pipe.components()
    return {
        "unet": pipe.denoiser.unet,
        "refiner_unet": pipe.refiner.unet if pipe.refiner is not None else None,
        "text_encoder": pipe.text_encoder,
        "movq": pipe.movq,
    }


def model_label(model: ModelConfig) -> str:
    refine = "+flash-refiner" if model.refine else ""
    # The file names and scales: the images of a LoRA job are not the checkpoint's alone.
    lora = ",".join(f"{os.path.basename(x.path)}@{x.scale:g}" for x in model.lora)
    lora = f"+lora({lora})" if lora else ""
    if is_kandinsky22(model):
        paths = model.kandinsky22_paths()
        depth = f"+depth({paths['depth_estimator']})" if paths["depth_estimator"] else ""
        return f"{model.name}:{paths['decoder']}+prior({paths['prior']}){depth}"
    # Conditioning models change only the rows that use them, but they are part of the model.
    extra = ""
    if model.controlnet:
        extra += f"+controlnet({model.controlnet})"
    if model.ip_adapter is not None:
        extra += "+ip-adapter({}, {})".format(*model.ip_adapter_paths())
    return f"{model.name}{refine}{lora}{extra}:{model.path}"
