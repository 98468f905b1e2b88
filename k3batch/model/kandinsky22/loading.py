"""Loading a Kandinsky 2.2 member for `Kandinsky22`: the prior folder (`PriorTransformer`,
CLIP text and image towers, tokenizer, `UnCLIPScheduler`, image processor), the member's
decoder folder (`UNet2DConditionModel`, its scheduler, MoVQ `VQModel`) and, for ControlNet
depth, a transformers depth estimator, each component in its own dtype and on its own device,
built into diffusers' `KandinskyV22*` pipeline objects."""

from __future__ import annotations

import contextlib
import logging

import torch

from k3batch.model.kandinsky22.kinds import KIND_CONTROLNET, KIND_IMAGE, KIND_INPAINT, KIND_TEXT
from k3batch.model.member import Member

# The keys of `dtype` and `device` mappings (a missing key: float32 / "auto").
COMPONENTS = ("prior", "text_encoder", "image_encoder", "unet", "movq", "depth_estimator")


@contextlib.contextmanager
def pil_fallback_quiet():
    """Import diffusers' Kandinsky 2.2 pipelines inside this. Their modules import
    transformers' `CLIPImageProcessor` by name, which without torchvision resolves to
    `CLIPImageProcessorPil` and says so in a warning ("requires torchvision ... falling back").
    k3batch passes the PIL processor by name itself (below), so the line says nothing about
    this run: transformers' import-time log is held at ERROR while they import."""
    from transformers.utils import logging as hf_logging

    log = hf_logging.get_logger("transformers.utils.import_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _setting(value, component: str, default: str) -> str:
    if isinstance(value, dict):
        return value.get(component, default)
    return value


def load(
    path: str,
    m: Member,
    prior_path: str,
    depth_estimator: str | None,
    dtype: dict | str,
    device: dict | str,
) -> tuple:
    """(the prior pipeline, member `m`'s decoder pipelines by kind, (depth estimator, its
    processor) or None); `Kandinsky22.from_pretrained` says what each argument names."""
    import diffusers
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from transformers import (
        CLIPImageProcessorPil,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    from k3batch.model.loading import DTYPES, resolve_device

    dtypes = {c: DTYPES[_setting(dtype, c, "float32")] for c in COMPONENTS}
    devices = {c: resolve_device(_setting(device, c, "auto")) for c in COMPONENTS}

    def place(module, name):
        return torch.nn.Module.to(module, devices[name], dtypes[name]).eval()

    def scheduler(folder):
        config = diffusers.DDPMScheduler.load_config(folder, subfolder="scheduler")
        return getattr(diffusers, config["_class_name"]).from_config(config)

    prior = place(PriorTransformer.from_pretrained(prior_path, subfolder="prior"), "prior")
    text_encoder = place(
        CLIPTextModelWithProjection.from_pretrained(prior_path, subfolder="text_encoder"),
        "text_encoder",
    )
    image_encoder = place(
        CLIPVisionModelWithProjection.from_pretrained(prior_path, subfolder="image_encoder"),
        "image_encoder",
    )
    with pil_fallback_quiet():
        prior_class = diffusers.KandinskyV22PriorPipeline
    prior_pipe = prior_class(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(prior_path, subfolder="tokenizer"),
        scheduler=scheduler(prior_path),
        # The PIL processor by name: the one diffusers' pipelines were written against, and
        # `CLIPImageProcessor` without torchvision warns that it falls back to it.
        image_processor=CLIPImageProcessorPil.from_pretrained(
            prior_path, subfolder="image_processor"
        ),
    )
    unet = place(UNet2DConditionModel.from_pretrained(path, subfolder="unet"), "unet")
    movq = place(VQModel.from_pretrained(path, subfolder="movq"), "movq")
    parts = dict(unet=unet, scheduler=scheduler(path), movq=movq)
    if m.needs_mask:
        pipes = {KIND_INPAINT: diffusers.KandinskyV22InpaintPipeline(**parts)}
    elif m.needs_hint:
        pipes = {KIND_CONTROLNET: diffusers.KandinskyV22ControlnetPipeline(**parts)}
    else:
        pipes = {
            KIND_TEXT: diffusers.KandinskyV22Pipeline(**parts),
            KIND_IMAGE: diffusers.KandinskyV22Img2ImgPipeline(**parts),
        }
    depth = None
    if depth_estimator is not None:
        from transformers import AutoImageProcessor, DPTForDepthEstimation

        depth = (
            place(DPTForDepthEstimation.from_pretrained(depth_estimator), "depth_estimator"),
            AutoImageProcessor.from_pretrained(depth_estimator, backend="pil"),
        )
    return prior_pipe, pipes, depth
