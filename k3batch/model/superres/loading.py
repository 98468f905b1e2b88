"""Loading KandiSuperRes (x4, x2, Flash x2) once per actor from the job's typed upscale
settings (`config.upscale.UpscaleConfig`): which checkpoint file, the tiny set of
`upscale.make_tiny`, and the label the `upscale_model` column records.

Light at import: torch and the models load inside `load_upscaler`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k3batch.config.upscale import UpscaleConfig


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
    from k3batch.model import hub

    name = upscale.file_name
    if os.path.isdir(upscale.path):
        return os.path.join(upscale.path, name)
    if hub.is_hub_id(upscale.path):
        from huggingface_hub import hf_hub_download

        return hf_hub_download(upscale.path, name)
    return upscale.path


def load_upscaler(upscale: UpscaleConfig):
    """The KandiSuperRes model `upscale` describes (builds the tiny one if asked). A
    `k3batch_config.json` beside the file (the tiny set's) gives the UNet's architecture."""
    import json

    from k3batch.model.loading import resolve_device
    from k3batch.model.superres.sr_unet import TINY_SR_CONFIG_FILE

    ensure_tiny_upscaler(upscale)
    file = upscaler_file(upscale)
    sidecar = os.path.join(os.path.dirname(file), TINY_SR_CONFIG_FILE)
    config = None
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            config = json.load(f)["sr_unet"]
    device = resolve_device(upscale.device)
    dtype = upscale.dtype or ("float16" if device.type == "cuda" else "float32")
    model = _load(upscale, file, device, dtype, config)
    if upscale.compile:
        from k3batch.model import compiling

        model.compiled = [compiling.compile_model("SR UNet", model.unet, "sr_unet", {})]
    return model


def _load(upscale: UpscaleConfig, file: str, device, dtype: str, config: dict | None):
    from k3batch.model.superres.pipeline import KandiSuperRes

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
