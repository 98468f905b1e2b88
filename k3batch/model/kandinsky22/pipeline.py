"""The Kandinsky 2.2 members on diffusers' own `KandinskyV22*` pipelines.

Design: k3batch does not re-implement Kandinsky 2.2's samplers. It loads the components
(prior folder: `PriorTransformer`, CLIP text and image towers, tokenizer, `UnCLIPScheduler`,
image processor; decoder folder: `UNet2DConditionModel`, its scheduler, MoVQ `VQModel`), each
in its own dtype and on its own device, builds diffusers' pipeline objects around them
(`KandinskyV22PriorPipeline`, `KandinskyV22Pipeline`, `KandinskyV22Img2ImgPipeline`,
`KandinskyV22InpaintPipeline`, `KandinskyV22ControlnetPipeline`) and calls those. The
numerics, the guidance `uncond + w*(cond - uncond)` (off at w <= 1) and the negative prompt's
handling are therefore diffusers' own; tests/test_kandinsky22.py checks each mode against
diffusers' combined pipelines.

Reproducibility: every row has its own CPU `torch.Generator` seeded from its `seed`, passed
to diffusers as a LIST of generators (diffusers' `randn_tensor` draws row i from generator
i). The same generator runs the prior and then the decoder, as
`KandinskyV22CombinedPipeline` does with its one generator. When a negative prompt is given,
the prior runs prompts and negative prompts as one batch of 2N rows; row i's generator then
serves rows i and N+i (it draws the prompt's noise, then the negative prompt's). A row's
image so depends on its row only, not on its batch.

Modes (`kind`): text-to-image; image-to-image for `kandinsky2.2` rows with an `image`
(`strength`); inpainting (`kandinsky2.2-inpaint`: k3batch's keep-mask, 1 = keep, becomes
diffusers' repaint mask 1 - keep, which diffusers binarises at 0.5); ControlNet depth (the
row's `hint`, or one estimated from its `image` with `model.depth_estimator`, see
`estimate_hint`); mixing (`mix`: `KandinskyV22PriorPipeline.interpolate` per row, then the
text-to-image decoder on the mixed embeddings; the row's `prompt` is not used).

Where k3batch departs from calling a pipeline once per batch, on purpose:
- inpainting runs the decoder one row per call (the prior stays batched): diffusers'
  `KandinskyV22InpaintPipeline` blends every row of a batch with the FIRST row's image and
  mask (`image[:1]`, `mask_image[:1]` in its loop), so batching it would be wrong;
- the decoders stop at the latents (`output_type="latent"`) and k3batch decodes them with
  MoVQ itself, `decode_batch_size` at a time (`movq.decode`; the ControlNet pipeline has no
  latent output and decodes its whole batch at once), then converts exactly as
  `output_type="np"` and diffusers' `numpy_to_pil` do: x*0.5+0.5, clamp to [0, 1], x255,
  round half to even, uint8 (diffusers computes x*0.5+0.5 in the MoVQ's dtype, k3batch in
  float32: equal for a float32 MoVQ);
- components on different devices or dtypes get forward hooks that move (and cast) each
  module's inputs to its own device and dtype and its outputs back to the pipeline's device,
  which diffusers' pipelines assume is one device for all. With one device and one dtype
  (the default) no hook is added.
"""

from __future__ import annotations

import logging
import math
import numbers

import numpy as np
import torch

from k3batch.model import family, performance
from k3batch.model import movq as movq_codec
from k3batch.model.request import Request, warm_up_requests

log = logging.getLogger(__name__)

KIND_TEXT = "text-to-image"
KIND_IMAGE = "image-to-image"
KIND_INPAINT = "inpainting"
KIND_CONTROLNET = "controlnet"
KIND_MIX = "mix"

# The keys of `dtype` and `device` mappings (a missing key: float32 / "auto").
COMPONENTS = ("prior", "text_encoder", "image_encoder", "unet", "movq", "depth_estimator")


def _setting(value, component: str, default: str) -> str:
    if isinstance(value, dict):
        return value.get(component, default)
    return value


class Kandinsky22:
    """A Kandinsky 2.2 member: the prior and the member's decoder pipelines for batches of
    rows (and, for ControlNet depth, an optional depth estimator)."""

    # The stage does not call `embed`: the prior encodes prompts itself, inside `generate`.
    shares_text_encoding = False

    def __init__(
        self,
        prior_pipe,
        decoder_pipes: dict,
        member: str,
        *,
        depth_estimator: tuple | None = None,
        decode_batch_size: int = 1,
    ):
        self.prior_pipe = prior_pipe
        self.decoder_pipes = decoder_pipes  # kind -> pipeline (they share unet, movq)
        self.member = family.MEMBERS[member]
        self.depth_estimator = depth_estimator  # (DPTForDepthEstimation, its processor)
        self.decode_batch_size = decode_batch_size
        self.movq_memory_format = torch.preserve_format
        self.max_batch: int | None = None  # rows per call; set on out-of-memory
        for pipe in [prior_pipe, *decoder_pipes.values()]:
            pipe.set_progress_bar_config(disable=True)
        decoder = next(iter(decoder_pipes.values()))
        self.unet = decoder.unet
        self.movq = decoder.movq

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        member: str = family.K22,
        prior_path: str = family.KANDINSKY22_PRIOR,
        depth_estimator: str | None = None,
        dtype: dict | str = "float32",
        device: dict | str = "auto",
        decode_batch_size: int = 1,
        performance: dict | None = None,
    ) -> Kandinsky22:
        """Load `member`'s decoder from `path` (a diffusers decoder folder or Hub repo), the
        prior from `prior_path` and, for ControlNet depth, a transformers depth estimator
        (`depth_estimator`: a DPT folder or Hub id). `dtype`/`device`: one value, or one per
        key of `COMPONENTS`."""
        import diffusers
        from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
        from transformers import (
            CLIPImageProcessor,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            CLIPVisionModelWithProjection,
        )

        from k3batch.model.loading import DTYPES, resolve_device

        m = family.MEMBERS[member]
        if m.family != family.KANDINSKY22:
            raise ValueError(f"{member} is not a Kandinsky 2.2 member")
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
        prior_pipe = diffusers.KandinskyV22PriorPipeline(
            prior=prior,
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            tokenizer=CLIPTokenizer.from_pretrained(prior_path, subfolder="tokenizer"),
            scheduler=scheduler(prior_path),
            image_processor=CLIPImageProcessor.from_pretrained(
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
                AutoImageProcessor.from_pretrained(depth_estimator),
            )
        model = cls(
            prior_pipe, pipes, member, depth_estimator=depth, decode_batch_size=decode_batch_size
        )
        model._align_devices()
        return model.optimize(**(performance or {}))

    def _align_devices(self) -> None:
        """Hooks that move each module's inputs to its device and dtype when the components
        differ in either (diffusers' pipelines assume one device and dtype)."""
        prior = {
            "prior": self.prior_pipe.prior,
            "text_encoder": self.prior_pipe.text_encoder,
            "image_encoder": self.prior_pipe.image_encoder,
        }
        decoder = {"unet": self.unet, "movq": self.movq}
        places = {_place(mod) for mod in [*prior.values(), *decoder.values()]}
        if len(places) == 1:
            return
        for modules, home in ((prior, _place(self.prior_pipe.prior)[0]), (decoder, self.device)):
            for mod in modules.values():
                _add_align_hooks(mod, home)

    def optimize(
        self,
        attention: str = "sdpa",
        channels_last: bool = False,
        compile: dict | None = None,
        tf32: bool = True,
    ) -> Kandinsky22:
        """`model.performance` on the decoder (see `performance`); returns self."""
        if any(performance.runs_float32_on_cuda(m) for m in self.components().values() if m):
            performance.set_tf32(tf32)
        performance.set_attention(self.unet, attention)
        performance.set_attention(self.movq, attention)
        if channels_last:
            performance.to_channels_last(self.unet)
            performance.to_channels_last(self.movq)
            self.movq_memory_format = torch.channels_last
        compile = compile or {}
        if compile.get("unet"):
            performance.compile_module(self.unet, compile)
        if compile.get("movq"):
            performance.compile_module(self.movq.decoder, compile)
        return self

    # ------------------------------------------------------------ what the stage reads
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def uncond(self) -> str:
        return (
            "prior: the negative prompt (empty when none); decoder: the negative prompt's "
            "prior embedding, or the CLIP image embedding of a zero image when there is none"
        )

    def components(self) -> dict:
        return {
            "prior": self.prior_pipe.prior,
            "text_encoder": self.prior_pipe.text_encoder,
            "image_encoder": self.prior_pipe.image_encoder,
            "unet": self.unet,
            "movq": self.movq,
            "depth_estimator": self.depth_estimator[0] if self.depth_estimator else None,
        }

    def kind(self, request: Request) -> str:
        if request.mix is not None:
            return KIND_MIX
        if self.member.needs_mask:
            return KIND_INPAINT
        if self.member.needs_hint:
            return KIND_CONTROLNET
        return KIND_IMAGE if request.image is not None else KIND_TEXT

    def _prior_settings(self, r: Request) -> tuple[int, float]:
        steps = r.prior_num_inference_steps
        scale = r.prior_guidance_scale
        return (
            self.member.prior_num_inference_steps if steps is None else steps,
            self.member.prior_guidance_scale if scale is None else scale,
        )

    def group_key(self, request: Request) -> tuple:
        """Rows with equal keys can share a `generate` call. Whether a negative prompt is
        given is part of it: diffusers treats None (zero-image embedding) and "" apart."""
        kind = self.kind(request)
        strength = request.strength if kind == KIND_IMAGE else None
        return (
            kind,
            request.width,
            request.height,
            request.num_inference_steps,
            request.guidance_scale,
            *self._prior_settings(request),
            strength,
            request.negative_prompt is not None,
        )

    def check_request(self, r: Request) -> None:
        """ValueError naming the field of a row this member cannot generate."""
        kind = self.kind(r)
        if kind == KIND_MIX:
            if self.member.name != family.K22:
                raise ValueError(f"mix: image mixing runs on {family.K22}, not {self.member.name}")
            check_mix(r.mix)
        elif kind == KIND_INPAINT:
            if r.image is None:
                raise ValueError("image: inpainting needs an image")
            if r.mask is None:
                raise ValueError("mask: inpainting needs a mask")
        elif kind == KIND_CONTROLNET:
            if r.hint is None and (r.image is None or self.depth_estimator is None):
                raise ValueError(
                    "hint: ControlNet depth needs a hint, or an image and model.depth_estimator"
                )
            if r.hint is not None:
                _check_image(r.hint, "hint", (r.height, r.width))

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def warm_up(self, width: int, height: int, batch_size: int) -> float:
        """One throwaway batch at this size (compiles a compiled model); returns seconds.
        Two prior steps (UnCLIPScheduler's least) and one decoder step: compilation depends
        on shapes, not on steps."""
        import time

        start = time.perf_counter()
        rows = warm_up_requests(self.member, width, height, batch_size, prior_num_inference_steps=2)
        self.generate(rows)
        return time.perf_counter() - start

    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[np.ndarray]:
        """Images (uint8, HxWx3) for rows of one `group_key`, `max_batch` rows at a time
        (halved on out-of-memory; an image does not depend on its batch)."""
        key = self.group_key(requests[0])
        if any(self.group_key(r) != key for r in requests):
            raise ValueError(
                "one generate() call takes rows of one kind, size, step counts, guidance "
                "scales, strength and negative-prompt presence"
            )
        for r in requests:
            self.check_request(r)
        limit = self.max_batch or len(requests)
        images, kept = performance.in_chunks_halving_on_oom(
            len(requests),
            limit,
            lambda start, size, _: self._generate(requests[start : start + size]),
            padded=False,
            what="sampling rows",
            device=self.device,
        )
        if kept < limit:
            self.max_batch = kept
        return images

    def _generate(self, rows: list[Request]) -> list[np.ndarray]:
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
        kind = self.kind(rows[0])
        if kind == KIND_MIX:
            embeds, negatives = self._mix(rows, generators)
        else:
            embeds, negatives = self._prior(rows, generators)
        embeds, negatives = embeds.to(self.device), negatives.to(self.device)
        first = rows[0]
        common = dict(
            width=first.width,
            height=first.height,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            output_type="latent",
            return_dict=False,
        )
        if kind == KIND_INPAINT:
            latents = torch.cat(
                [
                    self.decoder_pipes[KIND_INPAINT](
                        image=np.asarray(r.image, np.uint8),
                        # k3batch's keep-mask -> diffusers' repaint mask (1 = repaint).
                        mask_image=1.0 - np.asarray(r.mask, np.float32),
                        image_embeds=embeds[i : i + 1],
                        negative_image_embeds=negatives[i : i + 1],
                        generator=generators[i],
                        **common,
                    )[0]
                    for i, r in enumerate(rows)
                ]
            )
        elif kind == KIND_CONTROLNET:
            hints = [r.hint if r.hint is not None else self.estimate_hint(r.image) for r in rows]
            # This pipeline has no latent output: it decodes the batch itself, in [-1, 1].
            pixels = self.decoder_pipes[KIND_CONTROLNET](
                image_embeds=embeds,
                negative_image_embeds=negatives,
                hint=hint_tensor(hints).to(self.device, self.unet.dtype),
                generator=generators,
                **{**common, "output_type": "pt"},
            )[0]
            return list(movq_codec.to_uint8(pixels, rounding="round"))
        elif kind == KIND_IMAGE:
            latents = self.decoder_pipes[KIND_IMAGE](
                image=[_pil(r.image) for r in rows],
                image_embeds=embeds,
                negative_image_embeds=negatives,
                strength=first.strength,
                generator=generators,
                **common,
            )[0]
        else:  # text-to-image and mixing
            latents = self.decoder_pipes[KIND_TEXT](
                image_embeds=embeds,
                negative_image_embeds=negatives,
                generator=generators,
                **common,
            )[0]
        return self.decode(latents)

    def _prior(self, rows, generators) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings, negative image embeddings) of the rows' prompts."""
        steps, scale = self._prior_settings(rows[0])
        negatives = None
        if rows[0].negative_prompt is not None:
            negatives = [r.negative_prompt for r in rows]
            # diffusers appends the negatives to the prompts: row i's generator serves both.
            generators = generators + generators
        return self.prior_pipe(
            [r.prompt for r in rows],
            negative_prompt=negatives,
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=generators,
            output_type="pt",
            return_dict=False,
        )

    def _mix(self, rows, generators) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's mix, as `KandinskyV22PriorPipeline.interpolate` with its generator; a
        negative prompt acts in the prior and gives the negative embedding, as without mix."""
        steps, scale = self._prior_settings(rows[0])
        embeds, negatives = [], []
        for r, g in zip(rows, generators, strict=True):
            out = self.prior_pipe.interpolate(
                [item if isinstance(item, str) else _pil(item) for item, _ in r.mix],
                [float(w) for _, w in r.mix],
                num_inference_steps=steps,
                guidance_scale=scale,
                generator=g,
                negative_prior_prompt=r.negative_prompt,
                negative_prompt="" if r.negative_prompt is None else r.negative_prompt,
            )
            embeds.append(out.image_embeds)
            negatives.append(out.negative_image_embeds)
        return torch.cat(embeds), torch.cat(negatives)

    @torch.no_grad()
    def estimate_hint(self, image: np.ndarray) -> np.ndarray:
        """A depth hint (HxWx3 uint8, the image's size) from the depth estimator, as
        transformers' depth-estimation pipeline makes its `depth` image (bicubic to the
        image's size, min-max normalised, x255 truncated) and diffusers' `make_hint` repeats
        it on three channels."""
        if self.depth_estimator is None:
            raise ValueError("hint: no hint given and no model.depth_estimator to estimate it")
        _check_image(image, "image")
        model, processor = self.depth_estimator
        param = next(model.parameters())
        inputs = processor(images=_pil(image), return_tensors="pt")
        out = model(pixel_values=inputs["pixel_values"].to(param.device, param.dtype))
        depth = processor.post_process_depth_estimation(out, target_sizes=[image.shape[:2]])
        depth = depth[0]["predicted_depth"].float().cpu().numpy()
        span = depth.max() - depth.min()
        depth = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
        depth = (depth * 255).astype(np.uint8)
        return np.repeat(depth[:, :, None], 3, axis=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """MoVQ-decode to uint8 HWC images with diffusers' conversion (`movq.decode`)."""
        images, self.decode_batch_size = movq_codec.decode(
            self.movq, latents, self.decode_batch_size, self.movq_memory_format, rounding="round"
        )
        return images


# ---------------------------------------------------------------- row inputs
def hint_tensor(hints: list[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 depth maps -> (N, 3, H, W) float in [0, 1], as diffusers' `make_hint`."""
    return torch.stack(
        [
            torch.from_numpy(np.asarray(h, np.uint8)).float().div(255.0).permute(2, 0, 1)
            for h in hints
        ]
    )


def check_mix(mix) -> None:
    """ValueError naming `mix` (and the item) unless `mix` is a non-empty list of (prompt
    text or HxWx3 uint8 image, finite weight) items."""
    if not isinstance(mix, (list, tuple)) or not mix:
        raise ValueError("mix: expected a non-empty list of (prompt or image, weight) items")
    for i, item in enumerate(mix):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"mix[{i}]: expected a (prompt or image, weight) pair")
        cond, weight = item
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight)
        ):
            raise ValueError(f"mix[{i}]: weight {weight!r} is not a finite number")
        if isinstance(cond, str):
            continue
        if not isinstance(cond, np.ndarray):
            raise ValueError(
                f"mix[{i}]: expected a prompt or an HxWx3 uint8 image, got {type(cond).__name__}"
            )
        _check_image(cond, f"mix[{i}]")


def _check_image(image, field: str, size: tuple[int, int] | None = None) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"{field}: expected an HxWx3 uint8 image")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{field}: expected an HxWx3 uint8 image, got shape {image.shape}")
    if size is not None and image.shape[:2] != tuple(size):
        raise ValueError(
            f"{field}: size {image.shape[1]}x{image.shape[0]}, the row's is {size[1]}x{size[0]}"
        )


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(image, np.uint8))


# ---------------------------------------------------------------- mixed devices and dtypes
def _place(module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _move(value, device, dtype=None):
    """`value` (tensors, possibly nested in outputs, dicts, lists, tuples) on `device`;
    floating tensors also cast to `dtype` when given."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device, dtype)
        return value.to(device)
    if isinstance(value, dict):  # diffusers' BaseOutput and transformers' ModelOutput too
        for k in list(value.keys()):
            value[k] = _move(value[k], device, dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device, dtype) for v in value)
    return value


def _add_align_hooks(module, home) -> None:
    """Inputs to the module's device and dtype, outputs to `home` (the pipeline's device)."""
    device, dtype = _place(module)

    def before(_, args, kwargs):
        return _move(args, device, dtype), _move(kwargs, device, dtype)

    def after(_, args, kwargs, output):
        return _move(output, home)

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)
    if hasattr(module, "encode"):
        # The pipelines call MoVQ's encode, not its forward (k3batch decodes it itself).
        encode = module.encode

        def aligned_encode(*args, **kwargs):
            return _move(encode(*_move(args, device, dtype), **_move(kwargs, device, dtype)), home)

        module.encode = aligned_encode
