"""The Kandinsky 3.1 family on diffusers' model classes, sampled as the reference does.

Components load from either weight layout (`loading`): `Kandinsky3UNet` (one per family
member, each with its own text projection), `VQModel` (MoVQ), transformers'
`T5EncoderModel` and its tokenizer, shared by every member in memory. `Kandinsky3` holds
them and groups rows into batches; its samplers (`sampling`) follow ai-forever/Kandinsky-3,
not diffusers' pipelines.

GPU path (`model.performance`, `performance.py`): SDPA attention, channels_last,
torch.compile of the UNet(s) and the MoVQ decoder; cond and uncond rows run in one UNet
forward of twice the batch; MoVQ decode chunks halve on out-of-memory.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from k3batch.model import performance
from k3batch.model.kandinsky3 import members as k3_members
from k3batch.model.kandinsky3 import text as textmod
from k3batch.model.kandinsky3.denoiser import Denoiser
from k3batch.model.kandinsky3.sampling import (
    KIND_FLASH,
    KIND_IMAGE,
    KIND_INPAINT,
    KIND_TEXT,
    Sampling,
)
from k3batch.model.request import Request, warm_up_requests
from k3batch.model.schedule import DiffusionSchedule

log = logging.getLogger(__name__)


class Kandinsky3(Sampling):
    """Loaded family components and the reference samplers for batches of rows."""

    def __init__(
        self,
        tokenizer,
        text_encoder,
        movq,
        denoisers: dict[str, Denoiser],
        member: str = k3_members.BASE,
        *,
        refine: bool = False,
        decode_batch_size: int = 1,
    ):
        self.tokenizer = tokenizer
        # None when prompt embeddings come from the text encoder pool (`Request.text`).
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.movq = movq.eval()
        self.movq_memory_format = torch.preserve_format
        self.member = k3_members.MEMBERS[member]
        self.denoiser = denoisers[member]
        self.refiner = denoisers[k3_members.FLASH] if refine else None
        self.decode_batch_size = decode_batch_size
        self.max_batch: int | None = None  # rows per sample() call; set on out-of-memory
        self.device = self.denoiser.device
        self.schedule = DiffusionSchedule(self.device)
        self.control = None  # controlnet.Control with `model.controlnet` (base member)
        self.image_prompts = None  # ip_adapter.ImagePrompts with `model.ip_adapter` (base)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        member: str = k3_members.BASE,
        refine: bool = False,
        layout: str = "auto",
        dtype: dict | str = "float32",
        device: dict | str = "auto",
        variant: str | None = None,
        decode_batch_size: int = 1,
        performance: dict | None = None,
        text_encoder: bool = True,
        lora: list[tuple[str, float]] | None = None,
        controlnet: str | None = None,
        ip_adapter: tuple[str, str] | None = None,
    ) -> Kandinsky3:
        """Load a member (and the Flash refiner); `performance`: `optimize`'s arguments
        (`model.performance`); `text_encoder=False` leaves T5 to the text encoder pool;
        `lora`: (safetensors path, scale) pairs fused into the member's UNet (not the
        refiner's: a LoRA is trained for one UNet); `controlnet`: a Kandinsky 3 ControlNet
        folder for the base member (rows with a `hint`); `ip_adapter`: (adapter weights, CLIP
        image encoder) for the base member (rows with `ip_images`)."""
        from k3batch.model.kandinsky3 import loading

        if refine and not k3_members.MEMBERS[member].refinable:
            raise ValueError(f"refine works on {k3_members.BASE} jobs, not {member}")
        members = k3_members.members_needed(member, refine)
        parts = loading.load(
            path,
            members,
            layout=layout,
            dtype=dtype,
            device=device,
            variant=variant,
            text_encoder=text_encoder,
        )
        denoisers = {}
        for m in members:
            unet, null = parts.unets[m.name]
            if null is None and m.guidance_scale is not None:
                log.warning(
                    "%s has no null embedding for %s; the unconditional branch uses diffusers' "
                    "zero embeddings",
                    path,
                    m.name,
                )
            if lora and m.name == member:
                from k3batch.model.adapters import lora as lora_weights

                # On diffusers' module names (before Denoiser wraps the pooling) and before
                # optimize (compile and channels_last then see the fused weights).
                n = lora_weights.fuse(unet, lora)
                log.info("fused %d LoRA(s) into %s's UNet: %d weights", len(lora), member, n)
            denoisers[m.name] = Denoiser(m, unet, null)
        model = cls(
            parts.tokenizer,
            parts.text_encoder,
            parts.movq,
            denoisers,
            member,
            refine=refine,
            decode_batch_size=decode_batch_size,
        )
        if controlnet is not None:
            model.attach_controlnet(controlnet, dtype, device)
        model.optimize(**(performance or {}))
        if ip_adapter is not None:
            # After optimize: the adapter's processors wrap the attention processors it chose.
            model.attach_ip_adapter(*ip_adapter)
        return model

    def attach_controlnet(self, path: str, dtype="float32", device="auto") -> None:
        """Load the ControlNet at `path` next to the base UNet (its dtype and device)."""
        from k3batch.model.adapters import controlnet

        if self.member.name != k3_members.BASE:
            raise ValueError(
                f"model.controlnet works with the {k3_members.BASE} member, not {self.member.name}"
            )
        d = self.denoiser
        self.control = controlnet.Control(controlnet.load(path, d.dtype, d.device), d)

    def attach_ip_adapter(self, path: str, image_encoder: str) -> None:
        """Load the IP-Adapter at `path` onto the base UNet and the CLIP image encoder (the
        UNet's dtype and device)."""
        from k3batch.model.adapters import ip_adapter

        if self.member.name != k3_members.BASE:
            raise ValueError(
                f"model.ip_adapter works with the {k3_members.BASE} member, not {self.member.name}"
            )
        d = self.denoiser
        self.image_prompts = ip_adapter.load_image_prompts(d.unet, path, image_encoder, d.dtype)

    def optimize(
        self,
        attention: str = "sdpa",
        channels_last: bool = False,
        compile: dict | None = None,
        tf32: bool = True,
    ) -> Kandinsky3:
        """Apply `model.performance` to the loaded modules (see `performance`); returns self."""
        denoisers = [d for d in (self.denoiser, self.refiner) if d is not None]
        modules = [d.unet for d in denoisers] + [self.movq, self.text_encoder]
        if any(performance.runs_float32_on_cuda(m) for m in modules if m is not None):
            performance.set_tf32(tf32)
        for d in denoisers:
            performance.set_attention(d.unet, attention)
        performance.set_attention(self.movq, attention)
        if self.text_encoder is not None:
            performance.set_text_attention(self.text_encoder, attention)
        if channels_last:
            for d in denoisers:
                performance.to_channels_last(d.unet)
                d.memory_format = torch.channels_last
            performance.to_channels_last(self.movq)
            self.movq_memory_format = torch.channels_last
        compile = compile or {}
        if compile.get("unet"):
            for d in denoisers:
                performance.compile_module(d.unet, compile)
        if compile.get("movq"):
            # The decoder is nearly all of decode(); post_quant_conv is one 4->4 conv.
            performance.compile_module(self.movq.decoder, compile)
        return self

    @torch.no_grad()
    def warm_up(self, width: int, height: int, batch_size: int) -> float:
        """One throwaway batch at this size (compiles a compiled model); returns seconds.

        One step and blank inputs: compilation depends on shapes, not on values or steps.
        """
        import time

        start = time.perf_counter()
        text = None
        if self.text_encoder is None:
            width_in = self.denoiser.projection.projection_linear.in_features
            text = textmod.PromptEmbedding(torch.zeros(2, width_in))
        rows = warm_up_requests(self.member, width, height, batch_size, text=text)
        self.generate(rows)
        return time.perf_counter() - start

    # Views of the job's own member (tests and the stage read them).
    @property
    def unet(self):
        return self.denoiser.unet

    @property
    def projection(self):
        return self.denoiser.projection

    @property
    def pooling(self):
        return self.denoiser.pooling

    @property
    def null_embedding(self):
        return self.denoiser.null_embedding

    @property
    def uncond(self) -> str:
        return self.denoiser.uncond

    @property
    def unet_dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def kind(self, request: Request) -> str:
        if self.member.fixed_timesteps:
            return KIND_FLASH
        if self.member.needs_mask:
            return KIND_INPAINT
        return KIND_IMAGE if request.image is not None else KIND_TEXT

    def group_key(self, request: Request) -> tuple:
        """Rows with equal keys can share a `generate` call."""
        kind = self.kind(request)
        steps = 0 if kind == KIND_FLASH else request.num_inference_steps
        strength = request.strength if kind == KIND_IMAGE else None
        scheduler = None if kind == KIND_FLASH else request.scheduler
        return (request.width, request.height, steps, kind, strength, scheduler)

    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[np.ndarray]:
        """Images (uint8, HxWx3) for rows of one `group_key`.

        Rows are sampled `max_batch` at a time (all at once until memory runs out): a call
        that runs out of device memory is retried with half the rows, and `max_batch` keeps
        the smaller size for later batches. An image does not depend on its batch, so the
        split changes nothing but memory and speed.
        """
        limit = self.max_batch or len(requests)
        images, kept = performance.in_chunks_halving_on_oom(
            len(requests),
            limit,
            lambda start, size, _: self.decode(self.sample(requests[start : start + size])),
            padded=False,
            what="sampling rows",
            device=self.device,
        )
        if kept < limit:  # only running out of memory sets a bound (None: all rows at once)
            self.max_batch = kept
        return images

    @torch.no_grad()
    def embed(
        self, prompts: list[str], negative_prompts: list[str | None]
    ) -> list[textmod.PromptEmbedding]:
        """Per-row T5 outputs, as the text encoder pool makes them: rows that share one (a
        row's several images) pass it as `Request.text` and are encoded once."""
        if self.text_encoder is None:
            raise RuntimeError("the model was loaded without its text encoder")
        guided = self.denoiser.guided
        negatives = [n if guided else None for n in negative_prompts]
        tokens = textmod.tokenize(self.tokenizer, prompts, negatives)
        hidden = textmod.run_encoder(tokens, self.text_encoder, guided)
        return textmod.row_embeddings(hidden, tokens.lengths)
