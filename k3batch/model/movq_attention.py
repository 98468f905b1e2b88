"""Ways to run the MoVQ's attention (`model.performance.movq_attention`).

The MoVQ decoder's mid block and first up block attend over every latent pixel with one
head as wide as the block (16,384 tokens at 1024x1024). Flash attention stops at heads of
256, so torch's SDPA takes the memory-efficient kernel, and decode ran at 15% MFU on an H200.
The alternatives compute the same attention, softmax(q k^T / sqrt(d)) v, another way:

- `sdpa`: torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0; the default);
- `chunked`: the queries `CHUNK` at a time, each chunk's scores as one matrix product on the
  tensor cores, the softmax in float32, then one product with the values: two large GEMMs
  per chunk instead of the memory-efficient kernel's wide-head tiles; scores for one chunk at
  a time (`CHUNK` x tokens x 4 bytes: 256 MiB at 1024x1024);
- `split_heads`: the values' width split into heads of at most 256 that share the one
  query/key pair (the scores stay those of the full width, so the result is exact), each
  head through SDPA.

Whichever is used, `compile.movq` compiles it with its block. Each gives the `sdpa` images up
to float rounding (tests/test_speed.py); the device check measures their decode speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SDPA = "sdpa"
CHUNKED = "chunked"
SPLIT_HEADS = "split_heads"
KINDS = (SDPA, CHUNKED, SPLIT_HEADS)
CHUNK = 4096  # queries per chunk
SPLIT = 256  # widest value head of `split_heads`


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def chunked(q, k, v, chunk: int = CHUNK):
    scale = q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    outs = []
    for start in range(0, q.shape[-2], chunk):
        scores = torch.matmul(q[..., start : start + chunk, :], kt) * scale
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        outs.append(torch.matmul(weights, v))
    return torch.cat(outs, dim=-2)


def split_heads(q, k, v, width: int = SPLIT):
    b, heads, n, d = v.shape
    parts = -(-d // width)
    if parts == 1:
        return sdpa(q, k, v)
    # (b, heads, n, d) -> (b, heads * parts, n, d / parts); q and k repeated per part.
    vs = v.reshape(b, heads, n, parts, d // parts).permute(0, 1, 3, 2, 4)
    vs = vs.reshape(b, heads * parts, n, d // parts)
    qs = q.repeat_interleave(parts, dim=1)
    ks = k.repeat_interleave(parts, dim=1)
    out = F.scaled_dot_product_attention(qs, ks, vs, scale=q.shape[-1] ** -0.5)
    out = out.reshape(b, heads, parts, n, d // parts).permute(0, 1, 3, 2, 4)
    return out.reshape(b, heads, n, d)


ATTEND = {SDPA: sdpa, CHUNKED: chunked, SPLIT_HEADS: split_heads}


class MovqAttention:
    """A diffusers attention processor for the MoVQ's self-attention over a feature map,
    with `attend(q, k, v)` (each (batch, heads, tokens, width)) as one of `ATTEND`."""

    def __init__(self, kind: str):
        if kind not in ATTEND:
            raise ValueError(f"movq_attention must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.attend = ATTEND[kind]

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("MovqAttention is self-attention over a feature map, without a mask")
        x = hidden_states
        h = attn.spatial_norm(x, temb) if attn.spatial_norm is not None else x
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (b, pixels, c)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens.transpose(1, 2)).transpose(1, 2)

        def heads(t):
            return t.reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2)

        q, k, v = (heads(proj(tokens)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = self.attend(q, k, v).transpose(1, 2).reshape(b, -1, v.shape[1] * v.shape[3])
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        out = out.transpose(1, 2).reshape(b, c, height, width)
        if attn.residual_connection:
            out = out + x
        return out / attn.rescale_output_factor


def set_movq_attention(movq, kind: str) -> int:
    """Give the MoVQ's attention layers `kind` (`sdpa` leaves what `set_attention` chose);
    returns how many layers."""
    from diffusers.models.attention_processor import Attention

    if kind not in ATTEND:
        raise ValueError(f"movq_attention must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == SDPA:
        return 0
    layers = [m for m in movq.modules() if isinstance(m, Attention)]
    for m in layers:
        if m.norm_q is not None or m.norm_k is not None or m.added_kv_proj_dim is not None:
            raise ValueError("movq_attention: the MoVQ has an attention layer of another kind")
        m.set_processor(MovqAttention(kind))
    return len(layers)
