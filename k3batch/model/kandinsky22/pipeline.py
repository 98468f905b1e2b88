"""The Kandinsky 2.2 members on diffusers' own `KandinskyV22*` pipelines.

Design: k3batch does not re-implement Kandinsky 2.2's samplers. It loads the components
(`loading`: prior folder: `PriorTransformer`, CLIP text and image towers, tokenizer,
`UnCLIPScheduler`, image processor; decoder folder: `UNet2DConditionModel`, its scheduler,
MoVQ `VQModel`), each in its own dtype and on its own device, builds diffusers' pipeline
objects around them
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
  module's inputs to its own device and dtype and its outputs back to the pipeline's device
  (`devices`); with one device and one dtype (the default) no hook is added.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from k3batch.model import movq as movq_codec
from k3batch.model import performance
from k3batch.model.kandinsky22 import members as k22_members
from k3batch.model.kandinsky22.devices import align_devices
from k3batch.model.kandinsky22.inputs import check_image, check_mix, hint_tensor, pil
from k3batch.model.kandinsky22.kinds import (
    KIND_CONTROLNET,
    KIND_IMAGE,
    KIND_INPAINT,
    KIND_MIX,
    KIND_TEXT,
)
from k3batch.model.kandinsky22.prior import mix_embeddings, prompt_embeddings
from k3batch.model.request import Request, warm_up_requests

log = logging.getLogger(__name__)


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
        self.member = k22_members.MEMBERS[member]
        self.depth_estimator = depth_estimator  # (DPTForDepthEstimation, its processor)
        self.decode_batch_size = decode_batch_size
        self.movq_memory_format = torch.preserve_format
        self.max_batch: int | None = None  # rows per call; set on out-of-memory
        for pipe in [prior_pipe, *decoder_pipes.values()]:
            pipe.set_progress_bar_config(disable=True)
        decoder = next(iter(decoder_pipes.values()))
        self.unet = decoder.unet
        self.movq = decoder.movq
        self.compiled: list = []  # compiling.Regional / Whole per compiled model (optimize)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        member: str = k22_members.K22,
        prior_path: str = k22_members.PRIOR_REPO,
        depth_estimator: str | None = None,
        dtype: dict | str = "float32",
        device: dict | str = "auto",
        decode_batch_size: int = 1,
        performance: dict | None = None,
    ) -> Kandinsky22:
        """Load `member`'s decoder from `path` (a diffusers decoder folder or Hub repo), the
        prior from `prior_path` and, for ControlNet depth, a transformers depth estimator
        (`depth_estimator`: a DPT folder or Hub id). `dtype`/`device`: one value, or one per
        key of `loading.COMPONENTS`."""
        from k3batch.model.kandinsky22 import loading

        if member not in k22_members.MEMBERS:
            raise ValueError(f"{member} is not a Kandinsky 2.2 member")
        m = k22_members.MEMBERS[member]
        prior_pipe, pipes, depth = loading.load(path, m, prior_path, depth_estimator, dtype, device)
        model = cls(
            prior_pipe, pipes, member, depth_estimator=depth, decode_batch_size=decode_batch_size
        )
        align_devices(model.prior_pipe, model.unet, model.movq, model.device)
        return model.optimize(**(performance or {}))

    def optimize(
        self,
        attention: str = "sdpa",
        channels_last: bool = False,
        compile: dict | None = None,
        tf32: bool = True,
        cudnn_benchmark: bool = False,
        movq_attention: str = "sdpa",
        fp8: bool = False,
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
        self.compiled = performance.optimize_parts(
            [(self.member.name, self.unet)],
            self.movq,
            "kandinsky22_unet",
            compile=compile,
            cudnn_benchmark=cudnn_benchmark,
            movq_attention=movq_attention,
            fp8=fp8,
        )
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
            if self.member.name != k22_members.K22:
                raise ValueError(
                    f"mix: image mixing runs on {k22_members.K22}, not {self.member.name}"
                )
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
                check_image(r.hint, "hint", (r.height, r.width))

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
        performance.log_compiled(self.compiled)
        return time.perf_counter() - start

    def generate(self, requests: list[Request]) -> list[np.ndarray]:
        """Images (uint8, HxWx3) for rows of one `group_key`, `max_batch` rows at a time
        (halved on out-of-memory; an image does not depend on its batch)."""
        # no_grad in the body, not as a decorator: mutmut leaves decorated functions unmutated.
        with torch.no_grad():
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
        steps, scale = self._prior_settings(rows[0])
        if kind == KIND_MIX:
            embeds, negatives = mix_embeddings(self.prior_pipe, rows, generators, steps, scale)
        else:
            embeds, negatives = prompt_embeddings(self.prior_pipe, rows, generators, steps, scale)
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
                image=[pil(r.image) for r in rows],
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

    def estimate_hint(self, image: np.ndarray) -> np.ndarray:
        """A depth hint (HxWx3 uint8, the image's size) from the depth estimator, as
        transformers' depth-estimation pipeline makes its `depth` image (bicubic to the
        image's size, min-max normalised, x255 truncated) and diffusers' `make_hint` repeats
        it on three channels."""
        with torch.no_grad():
            if self.depth_estimator is None:
                raise ValueError("hint: no hint given and no model.depth_estimator to estimate it")
            check_image(image, "image")
            model, processor = self.depth_estimator
            param = next(model.parameters())
            inputs = processor(images=pil(image), return_tensors="pt")
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
