"""KandiSuperRes's pixel-space super-resolution UNet, with the published checkpoint's names.

The architecture of ai-forever/KandiSuperRes `model/unet_sr.py` as its loader builds it
(`get_sr_model`): a time-conditioned ResNet UNet without attention that reads the noisy
image and the bilinearly upsampled low-resolution image (6 channels) and predicts the clean
image (the sampler runs with prediction_type "sample"). Module and attribute names are
chosen so that `state_dict()` has exactly the checkpoint's keys and shapes, e.g.
`down_samples.0.resnet_attn_blocks.0.0.in_block.change_resolution.change_resolution.weight`:
the published `KandiSuperRes.ckpt` loads with `strict=True` and no renaming.

Quirks of the reference kept because the weights were trained with them:
- a ResNet block's first half is GroupNorm -> resample -> conv with no activation (the
  reference's `Block` gets `activation=None` there); only the second half has the SiLU and
  the time scale/shift;
- down levels halve at their first block, up levels double at their last (stride-2 4x4
  conv / transposed conv), so an input side must be a multiple of 8;
- the time embedding's frequencies are computed in the time tensor's dtype.
Dropout (p=0.1 in the reference's second half) is left out: this module is for inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The published x4 and x2 checkpoints (the reference's `get_sr_model` arguments).
SR_UNET = dict(
    init_channels=128,
    model_channels=128,
    image_channels=3,
    time_embed_dim=512,
    groups=32,
    dim_mult=(1, 2, 4, 8),
    num_resnet_blocks=(2, 4, 8, 8),
)
# The same layout, small enough for CPU tests (4 levels, so the same multiple-of-8 rule).
TINY_SR_UNET = dict(
    init_channels=8,
    model_channels=8,
    image_channels=3,
    time_embed_dim=16,
    groups=4,
    dim_mult=(1, 2, 2, 4),
    num_resnet_blocks=(2, 2, 2, 2),
)
# Beside a tiny KandiSuperRes set (`upscale.make_tiny`): the UNet's architecture, which
# `superres.loading.load_upscaler` reads. Here, not in `loading`, so that the tiny set's
# builder (`testing.tiny_sr`), which `loading` calls, need not import `loading` back.
TINY_SR_CONFIG_FILE = "k3batch_config.json"
# Each level but the last halves the resolution.
SIZE_MULTIPLE = 8


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin | cos], frequencies 10000^(-k/(dim/2 - 1)) in t's dtype."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -step)
    angles = t[:, None] * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimeEmbedding(nn.Module):
    """Parameter-free first entry of `to_time_embed` (keeps the Linear layers at .1 and .3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class Resample(nn.Module):
    """x2 down (4x4 stride-2 conv) or up (its transpose); the extra nesting level is the
    checkpoint's `change_resolution.change_resolution`."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.change_resolution = conv(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.change_resolution(x)


def _resample(channels: int, resample: str | None) -> nn.Module:
    return nn.Identity() if resample is None else Resample(channels, resample == "up")


class NormConv(nn.Module):
    """GroupNorm, optional time scale/shift and SiLU, optional resample, 3x3 conv."""

    def __init__(self, cin: int, cout: int, groups: int, act: bool, resample: str | None = None):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, cin)
        self.activation = nn.SiLU() if act else nn.Identity()
        self.change_resolution = _resample(cin, resample)
        self.projection = nn.Conv2d(cin, cout, kernel_size=3, padding=1)

    def forward(self, x, scale_shift=None):
        x = self.group_norm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        x = self.activation(x)
        return self.projection(self.change_resolution(x))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int, resample: str | None):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * cout))
        self.in_block = NormConv(cin, cout, groups, act=False, resample=resample)
        self.out_block = NormConv(cout, cout, groups, act=True)
        self.change_resolution = _resample(cin, resample)
        # A 1x1 conv on the skip path whenever the shape changes (channels or resolution).
        changed = cin != cout or resample is not None
        self.res_block = nn.Conv2d(cin, cout, kernel_size=1) if changed else nn.Identity()

    def forward(self, x, time_embed):
        scale_shift = self.time_mlp(time_embed)[:, :, None, None].chunk(2, dim=1)
        out = self.out_block(self.in_block(x), scale_shift)
        return out + self.res_block(self.change_resolution(x))


class Level(nn.Module):
    """One resolution level: ResNet blocks, each in a one-entry list (the checkpoint's
    `resnet_attn_blocks.<i>.0`; the reference's slot .1 is an attention-less Identity)."""

    def __init__(self, channels: list[tuple[int, int]], resamples, time_dim: int, groups: int):
        super().__init__()
        self.resnet_attn_blocks = nn.ModuleList(
            nn.ModuleList([ResBlock(cin, cout, time_dim, groups, r)])
            for (cin, cout), r in zip(channels, resamples, strict=True)
        )

    def forward(self, x, time_embed):
        for (block,) in self.resnet_attn_blocks:
            x = block(x, time_embed)
        return x


class SRUNet(nn.Module):
    """x0 prediction from (noisy image, time, low-resolution image); keys as published."""

    def __init__(
        self,
        init_channels: int,
        model_channels: int,
        image_channels: int,
        time_embed_dim: int,
        groups: int,
        dim_mult: tuple[int, ...],
        num_resnet_blocks: tuple[int, ...],
    ):
        super().__init__()
        if min(num_resnet_blocks) < 2:
            raise ValueError("num_resnet_blocks: at least 2 per level (up levels need two)")
        self.to_time_embed = nn.Sequential(
            TimeEmbedding(init_channels),
            nn.Linear(init_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        # The low-resolution image is concatenated to the noisy one.
        self.init_conv = nn.Conv2d(2 * image_channels, init_channels, kernel_size=3, padding=1)
        widths = [init_channels, *(model_channels * m for m in dim_mult)]
        pairs = list(zip(widths[:-1], widths[1:], strict=True))
        last = len(pairs) - 1
        self.down_samples = nn.ModuleList()
        for level, ((cin, cout), n) in enumerate(zip(pairs, num_resnet_blocks, strict=True)):
            first = "down" if level != last else None
            self.down_samples.append(
                Level(
                    [(cin, cout)] + [(cout, cout)] * (n - 1),
                    [first] + [None] * (n - 1),
                    time_embed_dim,
                    groups,
                )
            )
        self.up_samples = nn.ModuleList()
        up_plan = zip(reversed(pairs), reversed(num_resnet_blocks), strict=True)
        for level, ((cout, cin), n) in enumerate(up_plan):
            # The deepest up level gets no skip; the others the matching down level's output.
            skip = cin if level != 0 else 0
            self.up_samples.append(
                Level(
                    [(cin + skip, cin)] + [(cin, cin)] * (n - 2) + [(cin, cout)],
                    [None] * (n - 1) + ["up" if level != 0 else None],
                    time_embed_dim,
                    groups,
                )
            )
        self.norm = nn.GroupNorm(groups, init_channels)
        self.activation = nn.SiLU()
        self.out_conv = nn.Conv2d(init_channels, image_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, lowres: torch.Tensor) -> torch.Tensor:
        if lowres.shape[-2:] != x.shape[-2:]:
            lowres = F.interpolate(lowres, x.shape[-2:], mode="bilinear")
        x = self.init_conv(torch.cat([x, lowres], dim=1))
        time_embed = self.to_time_embed(t)
        skips = []
        for level, down in enumerate(self.down_samples):
            x = down(x, time_embed)
            if level != len(self.down_samples) - 1:
                skips.append(x)
        for level, up in enumerate(self.up_samples):
            if level != 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = up(x, time_embed)
        return self.out_conv(self.activation(self.norm(x)))
