"""One member's UNet wrapped as the reference runs it: its text projection outside the UNet,
attention pooling over each row's own prompt length, and the member's null embedding."""

from __future__ import annotations

import torch
from torch import nn

from k3batch.model.kandinsky3 import text as textmod
from k3batch.model.member import Member


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


class Denoiser:
    """One member's UNet with its text projection, row-length pooling and null embedding."""

    def __init__(self, member: Member, unet: nn.Module, null_embedding):
        self.member = member
        self.unet = unet.eval()
        # The text projection runs outside the UNet: the reference zeroes padded positions
        # and places `null_embedding` after the projection, in the UNet's context space.
        self.projection = unet.encoder_hid_proj
        unet.encoder_hid_proj = nn.Identity()
        self.pooling = RowLengthPooling(unet.add_time_condition)
        unet.add_time_condition = self.pooling
        self.null_embedding = null_embedding
        if not member.guided:
            self.uncond = textmod.UNCOND_NONE
        elif null_embedding is not None:
            self.uncond = textmod.UNCOND_NULL_EMBEDDING
        else:
            self.uncond = textmod.UNCOND_ZEROS
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.memory_format = torch.preserve_format  # channels_last with model.performance

    @property
    def guided(self) -> bool:
        return self.uncond != textmod.UNCOND_NONE

    def condition(self, hidden: textmod.Hidden, lengths: torch.Tensor) -> textmod.Conditioning:
        uncond = self.uncond if self.guided else None
        return textmod.project(
            hidden, lengths, self.projection, uncond, self.null_embedding, self.dtype
        )

    def __call__(self, x, t: int, context, mask, lengths) -> torch.Tensor:
        """Epsilon in float32 for a batch at one timestep."""
        self.pooling.lengths = lengths
        try:
            tt = torch.full((x.shape[0],), float(t), device=self.device)
            x = x.to(self.device, self.dtype, memory_format=self.memory_format)
            out = self.unet(x, tt, context, mask, return_dict=False)
        finally:
            self.pooling.lengths = None
        return out[0].float()
