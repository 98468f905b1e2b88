"""Kandinsky 3 IP-Adapter (image prompts) on diffusers' `Kandinsky3UNet`.

Architecture as the fork ai-forever/kandinsky3-diffusers defines it (`UNetKandi3IpAdapter`,
`Kandi3AttnProcessorIpAdapter`, `Kandinsky3IpAdapterPipeline`); written here from that
description, not copied:

- `image_proj` (Linear, image embedding -> tokens x context dim) and `image_norm` (LayerNorm
  over the context dim) turn one CLIP image embedding into `num_image_tokens` tokens;
- every cross-attention layer of the UNet gets a decoupled branch: the text attention's own
  query attends to the image tokens through `to_key_ip` / `to_v_ip` (with biases), and
  `to_out_ip(out_ip) * scale` is added to the text attention's output (`to_out_ip` starts at
  zero, so an untrained adapter leaves the UNet unchanged);
- several images are mixed before the projection: `sum_i weight_i * embed_i`, the weights used
  as given (the fork does not normalise them);
- the unconditional branch of guidance sees the embedding of an all-zero pixel tensor.

Weight layout: the fork's UNet state dict, whose adapter keys are `image_proj.*`,
`image_norm.*` and `<reference attention>.processor.{to_key_ip,to_v_ip,to_out_ip}.*` (e.g.
`down_samples.1.resnet_attn_blocks.0.1.attention.processor.to_key_ip.weight`). A file may
hold the whole UNet: only the adapter keys are read, and every one of them must be present.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import torch
from torch import nn

from k3batch.model.kandinsky3 import keymap, layout

ADAPTER_PARTS = ("to_key_ip", "to_v_ip", "to_out_ip")
NUM_IMAGE_TOKENS = 4  # the fork's num_image_tokens
IMAGE_EMBED_DIM = 768  # CLIP ViT-L/14 image embeddings, as the fork's image_proj takes
_CROSS = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.([1-9]\d*)\.attention$")


class Conditioning:
    """The image tokens and per-row scale every adapter processor of one UNet reads.

    diffusers' `Kandinsky3AttentionBlock` calls its attention with (x, context, mask) only, so
    the image tokens travel beside the call, set for the duration of one UNet forward.
    """

    def __init__(self):
        self.tokens: torch.Tensor | None = None  # (batch, tokens, context dim)
        self.scale: torch.Tensor | None = None  # (batch,)


class IPAttnProcessor(nn.Module):
    """Text attention (the processor it wraps) plus the decoupled image-token attention."""

    def __init__(self, inner: object, dim: int, context_dim: int, state: Conditioning):
        super().__init__()
        self.to_key_ip = nn.Linear(context_dim, dim)
        self.to_v_ip = nn.Linear(context_dim, dim)
        self.to_out_ip = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out_ip.weight)
        nn.init.zeros_(self.to_out_ip.bias)
        # Not a submodule attribute: the wrapped processor has no weights of ours.
        self.__dict__["inner"] = inner
        self.__dict__["state"] = state

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        tokens, scale = self.state.tokens, self.state.scale
        if tokens is None:
            return out
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states).view(b, n, heads, -1).transpose(1, 2)
        tokens = tokens.to(q.dtype)
        k = self.to_key_ip(tokens).view(b, tokens.shape[1], heads, -1).transpose(1, 2)
        v = self.to_v_ip(tokens).view(b, tokens.shape[1], heads, -1).transpose(1, 2)
        ip = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        ip = self.to_out_ip(ip.transpose(1, 2).reshape(b, n, -1))
        return out + ip * scale.to(ip.dtype).view(b, 1, 1)


class IPAdapter(nn.Module):
    """The adapter's weights on one UNet: image projection plus one processor per layer."""

    def __init__(
        self,
        unet: nn.Module,
        image_embed_dim: int = IMAGE_EMBED_DIM,
        num_image_tokens: int = NUM_IMAGE_TOKENS,
    ):
        super().__init__()
        context_dim = unet.config.cross_attention_dim
        self.num_image_tokens = num_image_tokens
        self.context_dim = context_dim
        self.image_proj = nn.Linear(image_embed_dim, context_dim * num_image_tokens)
        self.image_norm = nn.LayerNorm(context_dim)
        self.state = Conditioning()
        self.processors: dict[str, IPAttnProcessor] = {}
        for name in cross_attention_layers(unet):
            attn = unet.get_submodule(name)
            dim = attn.to_q.out_features
            proc = IPAttnProcessor(attn.processor, dim, context_dim, self.state)
            self.processors[name] = proc
            # Registered under the fork's module name (dots are not allowed in module names).
            self.add_module(_module_key(name), proc)
        self.__dict__["unet"] = unet

    def attach(self) -> None:
        """Install the adapter's processors on the UNet's cross-attention layers."""
        for name, proc in self.processors.items():
            self.unet.get_submodule(name).set_processor(proc)

    def image_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """(batch, image dim) embeddings -> (batch, tokens, context dim) tokens."""
        tokens = self.image_proj(embeds.to(self.image_proj.weight.dtype))
        return self.image_norm(tokens.reshape(embeds.shape[0], self.num_image_tokens, -1))

    @contextlib.contextmanager
    def conditioned(self, embeds: torch.Tensor, scale: torch.Tensor):
        """Every UNet call inside sees these rows' image tokens at these per-row scales."""
        self.state.tokens = self.image_tokens(embeds)
        self.state.scale = scale
        try:
            yield
        finally:
            self.state.tokens = None
            self.state.scale = None

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the fork's parameter names."""
        out = {f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
        out.update({f"image_norm.{k}": v for k, v in self.image_norm.state_dict().items()})
        for name, proc in self.processors.items():
            prefix = reference_name(name) + ".processor."
            out.update({prefix + k: v for k, v in proc.state_dict().items()})
        return out

    def load_reference_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the fork's keys strictly: every adapter key present, with its shape."""
        ours = self.reference_state_dict()
        adapter_keys = {k for k in state if is_adapter_key(k)}
        missing = sorted(set(ours) - adapter_keys)
        unexpected = sorted(adapter_keys - set(ours))
        if missing or unexpected:
            raise ValueError(
                f"IP-Adapter weights do not fit this UNet: missing {missing[:5]}"
                f" ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        with torch.no_grad():
            for key, param in ours.items():
                value = state[key]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(
                        f"IP-Adapter weight {key}: shape {tuple(value.shape)},"
                        f" the UNet needs {tuple(param.shape)}"
                    )
                param.copy_(value)


def _module_key(name: str) -> str:
    return reference_name(name).replace(".", "_")


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention `Attention` modules (the fork's adapter layers)."""
    from diffusers.models.attention_processor import Attention

    return [
        name for name, m in unet.named_modules() if isinstance(m, Attention) and _CROSS.match(name)
    ]


def reference_name(diffusers_name: str) -> str:
    """`down_blocks.1.attentions.1.attention` -> `down_samples.1.resnet_attn_blocks.0.1.attention`."""
    return keymap.unet_to_reference(diffusers_name + ".x")[: -len(".x")]


def is_adapter_key(key: str) -> bool:
    if key.startswith(("image_proj.", "image_norm.")):
        return True
    parts = key.split(".")
    return len(parts) >= 3 and parts[-3] == "processor" and parts[-2] in ADAPTER_PARTS


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors from a file: safetensors, or a pickle read tensors-only."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # The fork saves the UNet; a {'unet': ...} wrapper as the reference's checkpoints is read too.
        if isinstance(state, dict) and isinstance(state.get("unet"), dict):
            state = state["unet"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def mix_embeddings(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Several images of one row -> one embedding: `sum_i w_i * e_i`, weights as given."""
    return (embeds * weights.to(embeds.dtype)[:, None]).sum(0)


def load(unet: nn.Module, path: str, image_embed_dim: int = IMAGE_EMBED_DIM) -> IPAdapter:
    """Build the adapter for `unet`, load the fork's weights strictly and attach it (after
    the UNet's attention processors are chosen: the adapter wraps them)."""
    state = read_weights(layout.ip_adapter_file(path))
    dim = state["image_proj.weight"].shape[1] if "image_proj.weight" in state else image_embed_dim
    adapter = IPAdapter(unet, image_embed_dim=dim)
    adapter.load_reference_state_dict(state)
    first = next(unet.parameters())
    adapter.to(first.device, first.dtype)
    adapter.attach()
    return adapter


class ImageEncoder:
    """CLIP image embeddings as the fork's pipeline makes them: `CLIPImageProcessor`, then
    `CLIPVisionModelWithProjection(...).image_embeds`, one image per call (an image's
    embedding does not depend on what else is in the batch); and the unconditional branch's
    embedding of an all-zero pixel tensor (zeros after normalisation, at the encoder's size)."""

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device | str):
        from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(path, torch_dtype=dtype)
        self.model = self.model.to(device).eval()
        # The PIL processor by name: the fork's (older transformers) processing, and no warning
        # about a missing torchvision backend in every actor's log.
        self.processor = CLIPImageProcessorPil.from_pretrained(path)
        self.device, self.dtype = torch.device(device), dtype
        size = self.model.config.image_size
        self.zero = self._embed(torch.zeros(1, 3, size, size))

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        return self.model(pixel_values=pixels).image_embeds

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        """(1, dim) embedding of one HxWx3 uint8 image."""
        pixels = self.processor(images=[image], return_tensors="pt").pixel_values
        return self._embed(pixels)


class ImagePrompts:
    """A loaded adapter and its image encoder on one base UNet: per-row image tokens and scales
    for a guided batch (`Request.ip_images`, `Request.ip_adapter_scale`)."""

    def __init__(self, adapter: IPAdapter, encoder: ImageEncoder):
        if encoder.dim != adapter.image_proj.in_features:
            raise ValueError(
                f"model.ip_adapter.image_encoder: its image embeddings are {encoder.dim}-d, the "
                f"adapter's image_proj takes {adapter.image_proj.in_features}"
            )
        self.adapter = adapter
        self.encoder = encoder

    @staticmethod
    def wanted(requests) -> bool:
        return any(r.ip_images and r.ip_adapter_scale != 0 for r in requests)

    def row_embeddings(self, requests) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dim) mixed embeddings and (B,) scales; a row without images gets the zero
        image's embedding at scale 0 (its output is the plain UNet's, bit for bit)."""
        embeds, scales = [], []
        for r in requests:
            if r.ip_images:
                each = torch.cat([self.encoder.embed(image) for image, _ in r.ip_images])
                weights = torch.tensor([float(w) for _, w in r.ip_images], device=each.device)
                embeds.append(mix_embeddings(each, weights))
                scales.append(float(r.ip_adapter_scale))
            else:
                embeds.append(self.encoder.zero[0])
                scales.append(0.0)
        return torch.stack(embeds), torch.tensor(scales)

    def guided(self, requests):
        """The context for a guided batch [cond rows; uncond rows]: the cond rows see their
        images, the uncond rows the zero image, both at the row's scale (the fork's
        `img_weight` applies to the whole UNet call)."""
        embeds, scales = self.row_embeddings(requests)
        zero = self.encoder.zero.expand(len(requests), -1)
        device = self.adapter.image_proj.weight.device
        both = torch.cat([embeds, zero]).to(device)
        return self.adapter.conditioned(both, torch.cat([scales, scales]).to(device))


def load_image_prompts(
    unet: nn.Module, path: str, image_encoder: str, dtype: torch.dtype
) -> ImagePrompts:
    """The adapter at `path` attached to `unet`, and the CLIP image encoder (on the UNet's
    device, in `dtype`)."""
    adapter = load(unet, path)
    encoder = ImageEncoder(image_encoder, dtype, next(unet.parameters()).device)
    return ImagePrompts(adapter, encoder)
