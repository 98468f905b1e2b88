"""Kandinsky 3 ControlNet (HED): the hint network and a base-UNet forward that takes its residuals.

Architecture read from `UNetKandi3Controlnet` in ai-forever/kandinsky3-diffusers
(models/unet_kandi3.py) and written here on diffusers' Kandinsky 3 blocks:

- a copy of the base UNet's time embedding, attention pooling, input conv and encoder levels
  (all but the last: one per skip connection of the base UNet; three at the real size);
- `input_hint_block`: a stride-8 conv stack from the 3-channel hint image in pixel space to
  the input conv's channels, added after the input conv (its last conv starts at zero);
- `convs`: one zero-initialised 1x1 conv per level; its output is added to the base UNet's
  skip of that level (only the skip, not the path into the next encoder level).

The pipeline runs the ControlNet on the same batch as the UNet (both guidance branches), and
multiplies the residuals by `controlnet_conditioning_scale` inside the step window
`int(n * start) <= i <= int(n * end)`, 0 outside it. Here the scale is a per-row tensor,
so rows with different scales and windows share a batch.

The published weights (HF `ai-forever/kandinsky3_controlnet_hed`) use the fork's parameter
names (`to_time_embed`, `feature_pooling`, `in_layer`, `down_samples...resnet_attn_blocks`);
they map onto this module with the same key map as the base UNet (`keymap.unet_to_diffusers`)
and load strictly.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from k3batch.model.kandinsky3 import keymap

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# The base UNet's architecture (Kandinsky 3.0/3.1) as the fork's controlnet config states it.
REAL_CONFIG = dict(
    in_channels=4,
    time_embedding_dim=1536,
    groups=32,
    attention_head_dim=64,
    layers_per_block=3,
    block_out_channels=(384, 768, 1536, 3072),
    cross_attention_dim=4096,
    hint_channels=3,
)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class InputHint(nn.Module):
    """3-channel hint at pixel resolution -> `out_channels` at latent resolution (stride 8)."""

    # (in, out, stride) of conv1..conv7; each followed by SiLU, then `out`.
    LAYERS = [(16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2)]

    def __init__(self, hint_channels: int, out_channels: int):
        super().__init__()
        c = hint_channels
        for i, (width, stride) in enumerate(self.LAYERS, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c, width, 3, padding=1, stride=stride))
            setattr(self, f"act{i}", nn.SiLU())
            c = width
        self.out = _zero(nn.Conv2d(c, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(self.LAYERS) + 1):
            x = getattr(self, f"act{i}")(getattr(self, f"conv{i}")(x))
        return self.out(x)


class Kandinsky3ControlNet(nn.Module):
    """The hint encoder: returns one residual per skip connection of the base UNet."""

    def __init__(
        self,
        in_channels: int = 4,
        time_embedding_dim: int = 1536,
        groups: int = 32,
        attention_head_dim: int = 64,
        layers_per_block: int = 3,
        block_out_channels=(384, 768, 1536, 3072),
        cross_attention_dim: int = 4096,
        hint_channels: int = 3,
    ):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_kandinsky3 import (
            Kandinsky3AttentionPooling,
            Kandinsky3DownSampleBlock,
        )

        self.config = dict(
            in_channels=in_channels,
            time_embedding_dim=time_embedding_dim,
            groups=groups,
            attention_head_dim=attention_head_dim,
            layers_per_block=layers_per_block,
            block_out_channels=tuple(block_out_channels),
            cross_attention_dim=cross_attention_dim,
            hint_channels=hint_channels,
        )
        init_channels = block_out_channels[0] // 2
        # Same sinusoid as the base UNet (the reference's SinusoidalPosEmb); no parameters.
        self.time_proj = Timesteps(init_channels, flip_sin_to_cos=False, downscale_freq_shift=1)
        self.time_embedding = TimestepEmbedding(init_channels, time_embedding_dim)
        self.add_time_condition = Kandinsky3AttentionPooling(
            time_embedding_dim, cross_attention_dim, attention_head_dim
        )
        self.conv_in = nn.Conv2d(in_channels, init_channels, kernel_size=3, padding=1)
        self.input_hint_block = InputHint(hint_channels, init_channels)
        dims = [init_channels, *block_out_channels]
        levels = len(block_out_channels) - 1  # one per skip connection of the base UNet
        self.down_blocks = nn.ModuleList()
        self.convs = nn.ModuleList()
        for level in range(levels):
            self.down_blocks.append(
                Kandinsky3DownSampleBlock(
                    dims[level],
                    dims[level + 1],
                    time_embedding_dim,
                    None if level == 0 else cross_attention_dim,
                    layers_per_block,
                    groups,
                    attention_head_dim,
                    4,  # expansion_ratio, as Kandinsky3UNet
                    2,  # compression_ratio
                    True,  # every copied level downsamples (only the base's last does not)
                    level != 0,  # self-attention on all but the first level
                )
            )
            self.convs.append(_zero(nn.Conv2d(dims[level + 1], dims[level + 1], 1)))

    def forward(self, sample, timestep, context, mask, hint) -> list[torch.Tensor]:
        """`context`/`mask` as the base UNet's blocks take them (projected; additive mask)."""
        t = self.time_proj(timestep.expand(sample.shape[0])).to(sample.dtype)
        time_embed = self.time_embedding(t)
        if context is not None:
            time_embed = self.add_time_condition(time_embed, context, mask)
        x = self.conv_in(sample) + self.input_hint_block(hint.to(sample.dtype))
        residuals = []
        for block, conv in zip(self.down_blocks, self.convs, strict=True):
            # As the fork: the 1x1 conv's output is the residual AND the next level's input.
            x = conv(block(x, time_embed, context, mask))
            residuals.append(x)
        return residuals


def controlled_unet(unet, sample, timestep, context, mask, residuals=None) -> torch.Tensor:
    """diffusers' `Kandinsky3UNet.forward` with `residuals[level]` added to skip `level`.

    Mirrors that forward (same modules, same order), so with `residuals=None` the result is
    the UNet's own. `mask` is the 0/1 attention mask; the projection is the UNet's own
    `encoder_hid_proj` (an Identity under k3batch's Denoiser, which projects outside).
    """
    if mask is not None:
        mask = ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    t = unet.time_proj(timestep.expand(sample.shape[0])).to(sample.dtype)
    time_embed = unet.time_embedding(t)
    context = unet.encoder_hid_proj(context)
    if context is not None:
        time_embed = unet.add_time_condition(time_embed, context, mask)
    skips = []
    x = unet.conv_in(sample)
    for level, block in enumerate(unet.down_blocks):
        x = block(x, time_embed, context, mask)
        if level != unet.num_levels - 1:
            skips.append(x)
    if residuals is not None:
        if len(residuals) != len(skips):
            raise ValueError(f"{len(residuals)} ControlNet residuals for {len(skips)} UNet skips")
        skips = [s + r for s, r in zip(skips, residuals, strict=True)]
    for level, block in enumerate(unet.up_blocks):
        if level != 0:
            x = torch.cat([x, skips.pop()], dim=1)
        x = block(x, time_embed, context, mask)
    return unet.conv_out(unet.conv_act_out(unet.conv_norm_out(x)))


def step_scales(scale, start, end, step: int, steps: int) -> torch.Tensor:
    """Per-row residual multipliers at step `step` of `steps` (the fork's window rule)."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    start = torch.as_tensor(start, dtype=torch.float32)
    end = torch.as_tensor(end, dtype=torch.float32)
    lo = torch.floor(steps * start).long()
    hi = torch.floor(steps * end).long()
    inside = (step >= lo) & (step <= hi)
    return torch.where(inside, scale, torch.zeros_like(scale))


def controlnet_eps(unet, controlnet, sample, timestep, context, mask, hint, scales):
    """One step of the controlled UNet: residuals scaled per row, then the base UNet.

    `scales` is [batch]; a row at scale 0 gets exactly the base UNet's output (the residual
    terms are exact zeros), so a zero-scale row reproduces the plain image bit for bit.
    """
    additive = None if mask is None else ((1 - mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    ctx = unet.encoder_hid_proj(context)
    residuals = controlnet(sample, timestep, ctx, additive, hint)
    s = scales.to(sample.device, sample.dtype).view(-1, 1, 1, 1)
    residuals = [r * s for r in residuals]
    return controlled_unet(unet, sample, timestep, context, mask, residuals)


# ---------------------------------------------------------------- loading
def config_from_reference(cfg: dict) -> dict:
    """The fork's `UNetKandi3Controlnet` config.json -> this module's arguments."""
    model_channels = cfg["model_channels"]
    init = cfg.get("init_channels") or model_channels
    mults = cfg.get("dim_mult", (1, 2, 4, 8))
    blocks = set(cfg.get("num_blocks", (3, 3, 3, 3)))
    if len(blocks) != 1:
        raise ValueError(f"num_blocks {cfg.get('num_blocks')}: one value per level expected")
    block_out = tuple(model_channels * m for m in mults)
    if init != block_out[0] // 2:
        raise ValueError(
            f"init_channels {init} != block_out_channels[0] // 2 = {block_out[0] // 2}: "
            "diffusers' Kandinsky 3 blocks tie them"
        )
    return dict(
        in_channels=cfg.get("num_channels", 4),
        time_embedding_dim=cfg["time_embed_dim"],
        groups=cfg.get("groups", 32),
        attention_head_dim=cfg.get("head_dim", 64),
        layers_per_block=blocks.pop(),
        block_out_channels=block_out,
        cross_attention_dim=cfg.get("context_dim", 4096),
        hint_channels=cfg.get("hint_channels", 3),
    )


def reference_config(config: dict) -> dict:
    """This module's arguments -> the fork's config.json (what `save` writes)."""
    out = config["block_out_channels"]
    return {
        "_class_name": "UNetKandi3Controlnet",
        "model_channels": out[0],
        "init_channels": out[0] // 2,
        "num_channels": config["in_channels"],
        "time_embed_dim": config["time_embedding_dim"],
        "groups": config["groups"],
        "head_dim": config["attention_head_dim"],
        "dim_mult": [c // out[0] for c in out],
        "num_blocks": [config["layers_per_block"]] * len(out),
        "model_dim": config["cross_attention_dim"],
        "context_dim": config["cross_attention_dim"],
        "hint_channels": config["hint_channels"],
    }


def _read_state(path: str) -> dict:
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if os.path.exists(file):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"model.controlnet {path!r}: none of {list(WEIGHT_FILES)} found")


def load(path: str, dtype=torch.float32, device="cpu") -> Kandinsky3ControlNet:
    """A ControlNet folder (config.json + weights in the fork's names), loaded strictly."""
    with open(os.path.join(path, "config.json")) as f:
        config = config_from_reference(json.load(f))
    state = {keymap.unet_to_diffusers(k): v for k, v in _read_state(path).items()}
    with torch.device("meta"):
        model = Kandinsky3ControlNet(**config)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save(model: Kandinsky3ControlNet, path: str) -> None:
    """Write `model` as the published folder layout (fork names, safetensors)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {
        keymap.unet_to_reference(k): v.detach().contiguous() for k, v in model.state_dict().items()
    }
    save_file(state, os.path.join(path, WEIGHT_FILES[0]))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(reference_config(model.config), f, indent=2)


# ---------------------------------------------------------------- running with k3batch's sampler
def tiny_config(unet_config: dict) -> dict:
    """The ControlNet arguments matching a diffusers `Kandinsky3UNet` config (the tiny one)."""
    keys = [k for k in REAL_CONFIG if k != "hint_channels"]
    return {**{k: unet_config.get(k, REAL_CONFIG[k]) for k in keys}, "hint_channels": 3}


def active(start: float, end: float, step: int, steps: int) -> bool:
    """Whether step `step` (0-based) of `steps` is in the fork's control window:
    int(N * start) <= step <= int(N * end)."""
    return int(steps * start) <= step <= int(steps * end)


class SkipResiduals:
    """Adds residuals to a diffusers `Kandinsky3UNet`'s skips through forward pre-hooks.

    Decoder level l >= 1 receives `cat([x, skip])` with the skip of encoder level n-1-l in
    the last channels; the hook adds that level's residual there. With `residuals` None the
    UNet runs unchanged, so the base UNet keeps diffusers' own forward (and its compile).
    """

    def __init__(self, unet: nn.Module):
        self.residuals: list[torch.Tensor] | None = None
        n = len(unet.up_blocks)
        for level in range(1, n):
            unet.up_blocks[level].register_forward_pre_hook(self._hook(n - 1 - level))

    def _hook(self, index: int):
        def add(module, args):
            if self.residuals is None:
                return None
            x, *rest = args
            r = self.residuals[index]
            c = r.shape[1]
            x = torch.cat([x[:, :-c], x[:, -c:] + r.to(x.dtype)], dim=1)
            return (x, *rest)

        return add


class Control:
    """A loaded ControlNet attached to one base `Denoiser`: residuals for a guided batch."""

    def __init__(self, net: Kandinsky3ControlNet, denoiser):
        from k3batch.model.kandinsky3.denoiser import RowLengthPooling

        self.net = net.eval()
        # The ControlNet pools the text as the base UNet does under k3batch: per row, over
        # the row's own prompt length (the fork cuts the context to it).
        self.pooling = RowLengthPooling(net.add_time_condition)
        net.add_time_condition = self.pooling
        self.skips = SkipResiduals(denoiser.unet)
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype

    @staticmethod
    def wanted(requests) -> bool:
        return any(r.hint is not None and r.controlnet_conditioning_scale > 0 for r in requests)

    def hints(self, requests) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1]; a row without a hint gets zeros (and scale 0)."""
        h, w = requests[0].height, requests[0].width
        out = torch.zeros(len(requests), 3, h, w)
        for i, r in enumerate(requests):
            if r.hint is not None:
                out[i] = torch.from_numpy(r.hint.copy()).permute(2, 0, 1).float() / 255.0
        return out.to(self.device, self.dtype)

    def scales(self, requests, step: int, steps: int) -> torch.Tensor:
        """[B, 1, 1, 1]: each row's scale at this step, 0 without a hint or outside its window."""
        s = [
            r.controlnet_conditioning_scale
            if r.hint is not None
            and active(r.control_guidance_start, r.control_guidance_end, step, steps)
            else 0.0
            for r in requests
        ]
        return torch.tensor(s, dtype=self.dtype, device=self.device).view(-1, 1, 1, 1)

    def residuals(self, x, t, context, mask, lengths, hint, scale) -> list[torch.Tensor]:
        """Scaled residuals for a guided batch `x` = [cond rows; uncond rows] (2B): the fork
        runs the ControlNet on both branches with the same hint. `context` is projected."""
        self.pooling.lengths = lengths
        try:
            tt = torch.full((x.shape[0],), float(t), device=self.device)
            additive = ((1 - mask.to(self.dtype)) * -10000.0).unsqueeze(1)
            out = self.net(
                x.to(self.device, self.dtype), tt, context, additive, torch.cat([hint, hint])
            )
        finally:
            self.pooling.lengths = None
        scale = torch.cat([scale, scale])
        return [r * scale for r in out]
