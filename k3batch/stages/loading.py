"""Loading a stage's model once per actor, from the job's typed model settings
(`config.ModelConfig`): the generation and text-encoder stages share it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k3batch.config import ModelConfig


def ensure_tiny(model: ModelConfig) -> None:
    """Build the tiny checkpoint at `path` when the config asks for it (demo, tests)."""
    if model.make_tiny:
        from k3batch.testing.tiny import make_tiny

        layout = "reference" if model.layout == "reference" else "diffusers"
        make_tiny(model.path, layout=layout)


def load_model(model: ModelConfig, decode_batch_size: int = 1, text_encoder: bool = True):
    """The Kandinsky 3 pipeline `model` describes (builds the tiny one if asked).

    `text_encoder=False`: no T5; rows bring prompt embeddings from the text encoder pool.
    """
    from k3batch.model.kandinsky3 import Kandinsky3

    ensure_tiny(model)
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
    )


def model_components(pipe) -> dict:
    """The loaded modules by component name (for the device record)."""
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
    return f"{model.name}{refine}{lora}:{model.path}"
