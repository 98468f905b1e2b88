"""Kandinsky 3 text-to-image on diffusers' model classes, sampled as the reference does.

Components load with `from_pretrained` from a diffusers-layout checkpoint
(`kandinsky-community/kandinsky-3` or a local directory): `Kandinsky3UNet`, `VQModel`
(MoVQ), transformers' `T5EncoderModel` and its tokenizer. Sampling follows
ai-forever/Kandinsky-3 (see `schedule.py` and `text.py`), not diffusers' pipeline.

Reproducibility: every row has its own CPU `torch.Generator` seeded from its `seed`, drawing
its initial latent and its per-step noise, so an image depends only on its row, not on the
batch it ran in or the device's RNG.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from k3batch.model import text as textmod
from k3batch.model.schedule import DiffusionSchedule, base_timesteps

log = logging.getLogger(__name__)

NULL_EMBEDDING_FILE = "unet/null_embedding.safetensors"
BASE_THRESHOLD_PERCENTILE = 0.99

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Request:
    """One row to generate; rows of one `generate` call share size and step count."""

    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float


class RowLengthPooling(nn.Module):
    """The UNet's attention pooling with the reference's per-row context length.

    The reference pools with the mean over a context cut to the prompt's own length + 1
    (one prompt per call). k3batch's context is 128 positions for every row, so the plain
    mean would differ. Padded positions are zero, so the sum over the context divided by the
    row's own n + 1 is the reference's value.
    """

    def __init__(self, pooling: nn.Module):
        super().__init__()
        self.pooling = pooling
        self.lengths: torch.Tensor | None = None  # [batch] set by the sampler per forward

    def forward(self, x, context, context_mask=None):
        if self.lengths is None:
            raise RuntimeError("RowLengthPooling.lengths must be set before the UNet runs")
        query = context.sum(dim=1, keepdim=True) / self.lengths.to(context.dtype).view(-1, 1, 1)
        if context_mask is not None:
            context_mask = context_mask.to(dtype=context.dtype)
        out = self.pooling.attention(query, context, context_mask)
        return x + out.squeeze(1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_null_embedding(path: str) -> torch.Tensor | None:
    """The learned unconditional embedding, if the checkpoint ships one (k3batch's layout)."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        file = os.path.join(path, NULL_EMBEDDING_FILE)
        if not os.path.exists(file):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            file = hf_hub_download(path, NULL_EMBEDDING_FILE)
        except EntryNotFoundError:
            return None
    return load_file(file)["null_embedding"]


class Kandinsky3:
    """Loaded Kandinsky 3 components and the reference sampler for batches of rows."""

    def __init__(self, tokenizer, text_encoder, unet, movq, null_embedding, *, decode_batch_size=1):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.unet = unet.eval()
        self.movq = movq.eval()
        self.decode_batch_size = decode_batch_size
        # The text projection runs outside the UNet: the reference zeroes padded positions
        # and places `null_embedding` after the projection, in the UNet's context space.
        self.projection = unet.encoder_hid_proj
        unet.encoder_hid_proj = nn.Identity()
        self.pooling = RowLengthPooling(unet.add_time_condition)
        unet.add_time_condition = self.pooling
        self.null_embedding = null_embedding
        self.uncond = (
            textmod.UNCOND_NULL_EMBEDDING if null_embedding is not None else textmod.UNCOND_ZEROS
        )
        self.device = next(unet.parameters()).device
        self.schedule = DiffusionSchedule(self.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: dict[str, str],
        device: str = "auto",
        variant: str | None = None,
        decode_batch_size: int = 1,
    ) -> Kandinsky3:
        from diffusers import Kandinsky3UNet, VQModel
        from transformers import AutoTokenizer, T5EncoderModel

        dev = resolve_device(device)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = T5EncoderModel.from_pretrained(
            path, subfolder="text_encoder", dtype=DTYPES[dtype["text_encoder"]], variant=variant
        ).to(dev)
        unet = Kandinsky3UNet.from_pretrained(
            path, subfolder="unet", torch_dtype=DTYPES[dtype["unet"]], variant=variant
        ).to(dev)
        movq = VQModel.from_pretrained(
            path, subfolder="movq", torch_dtype=DTYPES[dtype["movq"]], variant=variant
        ).to(dev)
        null_embedding = _load_null_embedding(path)
        if null_embedding is None:
            log.warning(
                "%s has no %s; the unconditional branch uses diffusers' zero embeddings",
                path,
                NULL_EMBEDDING_FILE,
            )
        return cls(
            tokenizer, text_encoder, unet, movq, null_embedding, decode_batch_size=decode_batch_size
        )

    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def generate(self, requests: list[Request]) -> list[np.ndarray]:
        """Images (uint8, HxWx3) for rows that share width, height and step count."""
        first = requests[0]
        shape_key = (first.width, first.height, first.num_inference_steps)
        for r in requests:
            if (r.width, r.height, r.num_inference_steps) != shape_key:
                raise ValueError("one generate() call takes rows of one size and step count")
        tokens = textmod.tokenize(
            self.tokenizer, [r.prompt for r in requests], [r.negative_prompt for r in requests]
        )
        cond = textmod.encode(
            tokens,
            self.text_encoder,
            self.projection,
            self.uncond,
            self.null_embedding,
            self.unet_dtype,
        )
        latents = self._sample(requests, cond)
        return self.decode(latents)

    def _sample(self, requests: list[Request], cond: textmod.Conditioning) -> torch.Tensor:
        first = requests[0]
        shape = (4, first.height // 8, first.width // 8)
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        x = self._noise(generators, shape)
        w = torch.tensor([r.guidance_scale for r in requests], device=self.device).view(-1, 1, 1, 1)

        # Cond and uncond rows go through the UNet in one forward of twice the batch.
        context = torch.cat([cond.context, cond.uncond_context])
        mask = torch.cat([cond.context_mask, cond.uncond_mask])
        self.pooling.lengths = torch.cat([cond.pool_lengths, cond.pool_lengths])
        times = base_timesteps(first.num_inference_steps)
        try:
            for t, prev_t in zip(times, [*times[1:], 0], strict=True):
                unet_in = torch.cat([x, x]).to(self.unet_dtype)
                tt = torch.full((unet_in.shape[0],), float(t), device=self.device)
                out = self.unet(unet_in, tt, context, mask, return_dict=False)[0].float()
                eps_cond, eps_uncond = out.chunk(2)
                eps = (w + 1.0) * eps_cond - w * eps_uncond
                noise = self._noise(generators, shape) if prev_t != 0 else None
                x = self.schedule.ddim_step(x, t, prev_t, eps, noise, BASE_THRESHOLD_PERCENTILE)
        finally:
            self.pooling.lengths = None
        return x

    def _noise(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        # Drawn on CPU, one generator per row: the same seed gives the same noise on any
        # device and in any batch.
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return noise.to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """MoVQ-decode to uint8 HWC images, `decode_batch_size` latents per call.

        The default of 1 keeps decode memory flat (the decoder's attention at 1024x1024 is
        the memory peak) and makes results independent of batch size: convolution kernels
        may round differently for other batch shapes. One 1024x1024 decode (~34 TFLOP)
        already fills a GPU.
        """
        movq_dtype = next(self.movq.parameters()).dtype
        images = []
        for chunk in latents.split(self.decode_batch_size):
            out = self.movq.decode(chunk.to(movq_dtype), force_not_quantize=True).sample
            out = ((out.float() + 1.0) / 2.0).clamp(0.0, 1.0)
            # x255 then truncate, as the reference's torchvision ToPILImage does.
            out = out.mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images.extend(list(out))
        return images
