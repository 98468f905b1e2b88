"""FP8 GEMMs for a UNet's 1x1 convolutions and attention projections (`model.precision: fp8`).

About 40% of the Kandinsky 3 UNet's FLOPs are 1x1 convolutions (its ResNet blocks' channel
compression and expansion, the attention blocks' feed-forward) and the attention
projections: plain matrix products over pixels. Here each runs as one `torch._scaled_mm` of
E4M3 operands with row-wise scales, which Hopper's tensor cores run at twice the bfloat16
rate:

- the weight, quantised once at load: each output channel's row scaled so its largest
  magnitude is E4M3's largest (448), its scale kept in float32;
- the activation, quantised at every call the same way per row (per pixel), so an outlier
  pixel costs only its own row's precision;
- the product accumulates in float32 and comes out in the input's dtype (bfloat16), each
  output element times its row's and its column's scales; the bias is added after.

Everything else (3x3 convolutions, norms, attention scores, time embeddings and the small
per-row linears that modulate the norms) stays in the UNet's dtype. E4M3 keeps 3 mantissa
bits, so each operand is rounded by up to 1/16 of its value; `benchmarks/precision_drift.py`
measures what that does to whole images (PSNR against bfloat16), and the setting stays off by
default until real weights confirm it. Needs `torch._scaled_mm` on the device: CUDA GPUs of
compute capability 8.9 or later (Ada, Hopper), or torch's CPU kernel (torch >= 2.10).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
# cuBLASLt's FP8 GEMMs need both dimensions of the weight to be multiples of 16.
ALIGN = 16
MIN_CAPABILITY = (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as E4M3 with one float32 scale per row: x ~ q * scale, each row's largest
    magnitude mapped to E4M3's largest. An all-zero row keeps a tiny scale (q = 0)."""
    amax = x.detach().abs().amax(dim=1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def scaled_matmul(
    x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, out_dtype
) -> torch.Tensor:
    """x (M, K) @ W.T for W (N, K) held as E4M3 rows `weight_q` with scales (N, 1): x quantised
    per row, one scaled GEMM (float32 accumulation), out in `out_dtype`."""
    xq, xs = quantize_rows(x)
    return torch._scaled_mm(
        xq,
        weight_q.t(),  # (K, N) column-major, as the GEMM wants its second operand
        scale_a=xs,
        scale_b=weight_scale.t(),
        out_dtype=out_dtype,
    )


class _FP8Gemm(nn.Module):
    """The weight of a linear map as E4M3 rows and scales; the bias as it was."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_rows(weight.detach().reshape(weight.shape[0], -1))
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale)
        self.bias = bias
        self.out_features, self.in_features = q.shape

    def gemm(self, x2d: torch.Tensor) -> torch.Tensor:
        out = scaled_matmul(x2d, self.weight_q, self.weight_scale, x2d.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class FP8Linear(_FP8Gemm):
    """`nn.Linear` as a row-wise scaled FP8 GEMM."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gemm(x.reshape(-1, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)


class FP8Conv1x1(_FP8Gemm):
    """A 1x1, stride-1, ungrouped `nn.Conv2d` as a row-wise scaled FP8 GEMM over pixels."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.weight, conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # free in channels_last
        out = self.gemm(rows).reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return out.contiguous(memory_format=fmt)


def _convertible_conv(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.padding in ((0, 0), "valid")
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.in_channels % ALIGN == 0
        and m.out_channels % ALIGN == 0
    )


def _convertible_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.in_features % ALIGN == 0 and m.out_features % ALIGN == 0


def targets(unet: nn.Module) -> list[str]:
    """Names of the modules `convert` replaces: every 1x1 convolution, and every linear inside
    an attention layer (query/key/value/output projections), with dimensions that are
    multiples of 16. The time embedding and the norms' small per-row linears stay."""
    from diffusers.models.attention_processor import Attention

    names = [n for n, m in unet.named_modules() if _convertible_conv(m)]
    for prefix, attn in unet.named_modules():
        if isinstance(attn, Attention):
            names += [
                f"{prefix}.{n}" for n, m in attn.named_modules() if n and _convertible_linear(m)
            ]
    return names


def check_device(device: torch.device) -> None:
    """FP8 GEMMs need FP8 tensor cores on CUDA; torch's CPU kernel runs them too (slowly)."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            raise ValueError(
                "model.precision: fp8 needs a GPU with FP8 tensor cores (compute capability "
                f"8.9 or later: L4, L40S, H100, H200); {torch.cuda.get_device_name(device)} "
                f"is {cap[0]}.{cap[1]}"
            )
    elif device.type != "cpu":
        raise ValueError(f"model.precision: fp8 runs on CUDA or the CPU, not {device.type}")


def convert(unet: nn.Module, name: str = "UNet") -> int:
    """Replace `targets(unet)` with their FP8 versions in place; returns how many."""
    param = next(unet.parameters())
    check_device(param.device)
    if param.device.type == "cuda" and param.dtype != torch.bfloat16:
        # Row-wise scaled GEMMs on CUDA write bfloat16 only.
        raise ValueError(f"model.precision: fp8 runs a bfloat16 UNet on CUDA, not {param.dtype}")
    names = targets(unet)
    for full in names:
        parent_name, _, child = full.rpartition(".")
        parent = unet.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, FP8Conv1x1(old) if isinstance(old, nn.Conv2d) else FP8Linear(old))
    log.info("%s: %d 1x1 convolutions and attention linears as FP8 GEMMs", name, len(names))
    return len(names)
