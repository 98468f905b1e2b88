"""Loading a stage's model once per actor, from the job's typed model settings
(`config.ModelConfig`): the generation and text-encoder stages share it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k3batch.config import ModelConfig
    from k3batch.config.upscale import UpscaleConfig

# Beside a tiny KandiSuperRes set (`upscale.make_tiny`): the UNet's architecture.
TINY_SR_CONFIG_FILE = "k3batch_config.json"


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


def ensure_tiny_upscaler(upscale: UpscaleConfig) -> None:
    """Build the tiny KandiSuperRes checkpoints in `upscale.path` when the config asks."""
    if upscale.enabled and upscale.make_tiny:
        from k3batch.testing.tiny_sr import make_tiny_sr_folder

        make_tiny_sr_folder(upscale.path, flash=upscale.model == "flash-x2")


def flash_kandinsky3_path(upscale: UpscaleConfig) -> str:
    """The Kandinsky 3 checkpoint of the Flash x2 refine: `upscale.kandinsky3_path`, else the
    tiny one `make_tiny` builds in `path`/kandinsky3."""
    if upscale.kandinsky3_path is not None:
        return upscale.kandinsky3_path
    return os.path.join(upscale.path, "kandinsky3")


def upscaler_file(upscale: UpscaleConfig) -> str:
    """The checkpoint file of `upscale.model`: in the directory `path`, the file `path`,
    or fetched from the Hugging Face repo `path`."""
    from k3batch.model import family

    name = upscale.file_name
    if os.path.isdir(upscale.path):
        return os.path.join(upscale.path, name)
    if family.is_hub_id(upscale.path):
        from huggingface_hub import hf_hub_download

        return hf_hub_download(upscale.path, name)
    return upscale.path


def load_upscaler(upscale: UpscaleConfig):
    """The KandiSuperRes model `upscale` describes (builds the tiny one if asked). A
    `k3batch_config.json` beside the file (the tiny set's) gives the UNet's architecture."""
    import json

    from k3batch.model.loading import resolve_device
    from k3batch.model.superres.pipeline import KandiSuperRes

    ensure_tiny_upscaler(upscale)
    file = upscaler_file(upscale)
    sidecar = os.path.join(os.path.dirname(file), TINY_SR_CONFIG_FILE)
    config = None
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            config = json.load(f)["sr_unet"]
    device = resolve_device(upscale.device)
    dtype = upscale.dtype or ("float16" if device.type == "cuda" else "float32")
    if upscale.model == "flash-x2":
        from k3batch.model.superres.flash import KandiSuperResFlash

        return KandiSuperResFlash.from_pretrained(
            file,
            flash_kandinsky3_path(upscale),
            device=str(device),
            dtype=dtype,
            config=config,
            max_tiles_per_call=upscale.max_tiles_per_call,
            window=upscale.window,
            stride=upscale.stride,
            whole_canvas_side=upscale.flash_whole_canvas_side,
        )
    return KandiSuperRes.from_pretrained(
        file,
        upscale.scale,
        device=str(device),
        dtype=dtype,
        config=config,
        window=upscale.window,
        stride=upscale.stride,
        max_tiles_per_call=upscale.max_tiles_per_call,
    )


def upscaler_label(upscale: UpscaleConfig) -> str:
    """The `upscale_model` column: which model and settings made the upscaled image."""
    steps = "" if upscale.model == "flash-x2" else f"@{upscale.num_inference_steps}steps"
    return f"kandisuperres-{upscale.model}{steps}:{upscale.path}"
