"""MoVQ encode and decode as the family's sampler runs them: images independent of the batch
they ran in, decode memory flat.

Encode runs one image per call. Decode runs `batch_size` latents per call, padded to that
shape: convolution kernels pick their algorithm by shape and may round differently for
other batch shapes. The default of 1 keeps decode memory flat (the decoder's activations at
1024x1024 are the memory peak; one such decode, ~34 TFLOP, already fills a GPU). A call that
runs out of device memory is retried with half the latents.
"""

from __future__ import annotations

import numpy as np
import torch

from k3batch.model import performance


@torch.no_grad()
def encode(movq, pixels: torch.Tensor) -> torch.Tensor:
    """float32 latents of [-1, 1] images, one image per call."""
    dtype = next(movq.parameters()).dtype
    return torch.cat([movq.encode(p[None].to(dtype)).latents.float() for p in pixels])


@torch.no_grad()
def decode(
    movq,
    latents: torch.Tensor,
    batch_size: int,
    memory_format=torch.preserve_format,
    rounding: str = "truncate",
) -> tuple[list[np.ndarray], int]:
    """(uint8 HWC images, the batch size in effect after any out-of-memory halving).

    `rounding`: how [0, 1] becomes 0..255: `truncate` (x255 then truncate, as the
    Kandinsky 3 reference's torchvision ToPILImage) or `round` (x255 then round half to
    even, as diffusers' `numpy_to_pil`, which Kandinsky 2.2's pipelines use)."""
    param = next(movq.parameters())
    return performance.in_chunks_halving_on_oom(
        len(latents),
        batch_size,
        lambda start, size, pad_to: _decode_chunk(
            movq, latents[start : start + size], param, pad_to, memory_format, rounding
        ),
        padded=True,
        what="MoVQ decode of latents",
        device=param.device,
    )


def _decode_chunk(
    movq, latents, param, pad_to: int, memory_format, rounding="truncate"
) -> list[np.ndarray]:
    n = len(latents)
    if n < pad_to:
        # Always decode `pad_to` latents at once (zeros fill the rest): a fixed shape keeps an
        # image independent of how many rows its batch had.
        fill = latents.new_zeros((pad_to - n, *latents.shape[1:]))
        latents = torch.cat([latents, fill])
    z = latents.to(param.device, param.dtype, memory_format=memory_format)
    out = movq.decode(z, force_not_quantize=True).sample[:n]
    return list(to_uint8(out, rounding))


def to_uint8(decoded: torch.Tensor, rounding: str = "truncate") -> np.ndarray:
    """MoVQ output in [-1, 1], NCHW -> uint8 NHWC (`rounding`: see `decode`)."""
    out = ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0).mul(255)
    if rounding == "round":
        out = out.round()
    return out.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
