"""The GPU path's switches, applied to loaded modules: attention kernel, memory format, compile.

Each one changes how the arithmetic runs, not what it computes: outputs stay equal to the
plain path up to float rounding (tests/test_performance.py checks each on the tiny model).

Precision is set per component by `model.dtype`; whatever those dtypes are, the sampler
keeps its state in float32 (see `kandinsky3` and `schedule`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

SDPA = "sdpa"
EAGER = "eager"


def set_attention(module: nn.Module, kind: str) -> int:
    """Give every diffusers `Attention` in `module` the `kind` processor; returns how many.

    `sdpa` is diffusers' AttnProcessor2_0 (torch's scaled_dot_product_attention), already
    diffusers' default; setting it explicitly keeps a checkpoint or an earlier call from
    leaving the score-materialising AttnProcessor in place. This covers the UNet's self- and
    cross-attention, its attention pooling and the MoVQ encoder/decoder attention (mid block
    and the first up block, 128x128 = 16384 tokens of one 1024-wide head at 1024x1024: the
    eager score matrix alone is 1 GiB per image in float32). Attention with added key/value
    projections (Kandinsky 2.2's decoder UNet) takes the added-KV processor of that kind:
    the plain one would drop the image-embedding tokens.
    """
    from diffusers.models.attention_processor import (
        Attention,
        AttnAddedKVProcessor,
        AttnAddedKVProcessor2_0,
        AttnProcessor,
        AttnProcessor2_0,
    )

    if kind not in (SDPA, EAGER):
        raise ValueError(f"attention must be {SDPA} or {EAGER}, got {kind!r}")
    plain, added_kv = (
        (AttnProcessor2_0(), AttnAddedKVProcessor2_0())
        if kind == SDPA
        else (AttnProcessor(), AttnAddedKVProcessor())
    )
    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(added_kv if m.added_kv_proj_dim is not None else plain)
            n += 1
    return n


def set_text_attention(text_encoder: nn.Module, kind: str) -> None:
    """transformers' attention implementation of the T5 encoder (`sdpa` or `eager`)."""
    text_encoder.set_attn_implementation(kind)


def to_channels_last(module: nn.Module) -> nn.Module:
    # nn.Module.to: diffusers' ModelMixin.to only adds dtype-cast warnings.
    return nn.Module.to(module, memory_format=torch.channels_last)


def compile_module(module: nn.Module, settings: dict) -> nn.Module:
    """`module.compile(...)` in place, whole (`compiling.compile_whole`)."""
    from k3batch.model import compiling

    return compiling.compile_whole(module, settings)


def set_cudnn_benchmark(enabled: bool) -> None:
    """cuDNN times its algorithms per new convolution shape and keeps the fastest
    (process-wide; torch's default is off)."""
    torch.backends.cudnn.benchmark = enabled


def optimize_parts(
    unets: list[tuple[str, nn.Module]],
    movq: nn.Module,
    unet_blocks: str,
    *,
    compile: dict | None = None,
    cudnn_benchmark: bool = False,
    movq_attention: str = "sdpa",
    fp8: bool = False,
) -> list:
    """The settings every family applies alike once attention and memory format are set:
    FP8 GEMMs in the UNets (`fp8`), the MoVQ's attention, cuDNN autotuning, then compile
    (`unet_blocks`: the UNets' entry of `compiling.BLOCKS`). Returns the compiled models,
    whose `summary()` the actor logs after warm-up."""
    from k3batch.model import compiling
    from k3batch.model import fp8 as fp8_gemms
    from k3batch.model.movq_attention import set_movq_attention

    if fp8:
        for name, unet in unets:
            fp8_gemms.convert(unet, f"{name} UNet")
    set_movq_attention(movq, movq_attention)
    set_cudnn_benchmark(cudnn_benchmark)
    compile = compile or {}
    compiled = []
    if compile.get("unet"):
        for name, unet in unets:
            compiled.append(compiling.compile_model(f"{name} UNet", unet, unet_blocks, compile))
    if compile.get("movq"):
        # The decoder is nearly all of decode(); post_quant_conv is one 4->4 conv.
        compiled.append(
            compiling.compile_model("MoVQ decoder", movq.decoder, "movq_decoder", compile)
        )
    return compiled


def log_compiled(compiled: list) -> None:
    """One line per compiled model: blocks run compiled and eager (after a warm-up)."""
    for c in compiled:
        log.info("%s", c.summary())


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (process-wide).

    torch leaves float32 matmuls in full float32 by default (8x slower than TF32 on an H100);
    TF32 keeps float32's range with a 10-bit mantissa, as cuDNN convolutions already use by
    default. Drift against strict float32: benchmarks/precision_drift.py.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def runs_float32_on_cuda(module: nn.Module) -> bool:
    param = next(module.parameters(), None)
    return param is not None and param.device.type == "cuda" and param.dtype == torch.float32


# CUDA errors after which the process's CUDA context is unusable: every later call fails too.
# Only a new process recovers (an out-of-memory error is not one of them).
_POISONING = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
    "an illegal",
)


def poisons_process(error: BaseException) -> bool:
    """Whether `error` is a CUDA error that leaves this process's CUDA context unusable."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    text = str(error).lower()
    # torch >= 2.8 raises torch.AcceleratorError for CUDA errors; older ones a RuntimeError.
    cuda = type(error).__name__ == "AcceleratorError" or "cuda error" in text
    return cuda and any(p in text for p in _POISONING)


def in_chunks_halving_on_oom(
    total: int, chunk_size: int, run, *, padded: bool, what: str, device
) -> tuple[list, int]:
    """`run(start, size, chunk_size)` over `total` items, `chunk_size` at a time (`size` is
    less for the last chunk); returns (the outputs in order, the chunk size to keep).

    A call that runs out of device memory is retried with half as many items (half the
    chunk size when `padded`: such calls always ran `chunk_size` items), out of the except
    block, so the failed call's tensors are already freed, and with the allocator's cache
    emptied. A single item that does not fit raises.
    """
    out: list = []
    start = 0
    while start < total:
        size = min(chunk_size, total - start)
        try:
            chunk = run(start, size, chunk_size)
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            chunk = None
        if chunk is None:
            tried = chunk_size if padded else size
            chunk_size = max(1, tried // 2)
            log.warning("%s of %d ran out of memory; %d at a time", what, tried, chunk_size)
            release_cached_memory(torch.device(device))
            continue
        out.extend(chunk)
        start += size
    return out, chunk_size


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
