"""`model.performance:` attention kernels and `torch.compile` (how fast, never what is computed)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from k3batch.config.base import Strict


class CompileConfig(Strict):
    """`torch.compile` of the denoising UNet(s) and the MoVQ decoder (off by default)."""

    unet: bool = Field(
        False,
        description="Compile the UNet(s) (every member the job loads). The first batch of each "
        "new shape (size, batch) compiles.",
    )
    movq: bool = Field(
        False,
        description="Compile the MoVQ decoder: worth it for Flash, where decoding is ~70% of "
        "the work.",
    )
    scope: Literal["regional", "whole"] = Field(
        "regional",
        description="`regional`: each repeated block (the UNet's ResNet and attention "
        "blocks, the MoVQ decoder's mid and up blocks) compiled on its own with static shapes "
        "and `fullgraph`, blocks of one class and shape sharing a graph (29 graphs for the "
        "Kandinsky 3 UNet instead of one of ~4,900 nodes: what made the whole 3B UNet take "
        "minutes); Dynamo's recompile limit is raised to the distinct shapes counted, and a "
        "block that cannot compile runs eager with a warning; the actor logs one line per "
        "model: blocks compiled, eager, graphs. `whole`: the whole module in one "
        "torch.compile call, with `fullgraph` and `dynamic` as set.",
    )
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        Field(
            "default",
            description="torch.compile `mode`. `reduce-overhead` replays each compiled graph "
            "as a CUDA graph (fewer kernel launches; per block with `scope: regional`); "
            "`max-autotune` also benchmarks kernel choices (longer compile).",
        )
    )
    backend: str = Field("inductor", description="torch.compile `backend`.")
    fullgraph: bool = Field(
        False,
        description="torch.compile `fullgraph` with `scope: whole`: fail on graph breaks "
        "instead of splitting (`regional` always compiles each block whole).",
    )
    dynamic: bool | None = Field(
        None,
        description="torch.compile `dynamic`; null: static shapes with `scope: regional`; with "
        "`whole`, recompile once with dynamic shapes when a shape changes (e.g. a smaller last "
        "batch).",
    )
    conv_1x1_as_mm: bool = Field(
        False,
        description="Inductor's `conv_1x1_as_mm`: 1x1 convolutions (~40% of the Kandinsky 3 "
        "UNet's FLOPs) as matrix products Inductor can fuse with their neighbours; among "
        "diffusers' documented compile settings. Off until measured on a GPU "
        "(`benchmarks/device_check.sh`).",
    )
    coordinate_descent_tuning: bool = Field(
        False,
        description="Inductor's `coordinate_descent_tuning`: tunes each generated kernel's "
        "block sizes at compile time (longer compile, sometimes faster kernels); among "
        "diffusers' documented settings. Off until measured on a GPU.",
    )
    warmup: bool = Field(
        True,
        description="Compile when the actor starts, on one batch of `resources.batch_size` "
        "rows at `generation`'s size, instead of on the first real batch.",
    )
    cache_dir: str | None = Field(
        None,
        description="Directory for torch.compile's caches (Inductor's and Triton's kernels): "
        "actors that share it (one node, or a shared filesystem) compile once and load the "
        "rest from it. null: torch's default, a per-user folder under /tmp.",
    )
    artifacts: bool = Field(
        True,
        description="With `cache_dir` and `warmup`: an actor that compiled writes torch's "
        "portable compile artifacts (`torch.compiler.save_cache_artifacts`: generated kernels, "
        "autotuning results) to `<cache_dir>/artifacts/`, one file per torch version, device, "
        "model and shape; an actor that finds its file loads it before warming up, so Inductor "
        "generates no kernel again (Dynamo still traces). Copy that folder to other nodes, or "
        "bake it into an image, to ship a compiled model with the job.",
    )


class PerformanceConfig(Strict):
    """Speed settings that keep each image equal to the plain path up to float rounding
    (all but `fp8`)."""

    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel of every attention layer (UNet, its attention pooling, "
        "MoVQ, T5). `sdpa`: torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0; "
        "flash / memory-efficient kernels on GPUs, no 16384x16384 score matrix in the MoVQ "
        "decoder at 1024x1024). `eager`: diffusers' AttnProcessor, scores materialised.",
    )
    movq_attention: Literal["sdpa", "chunked", "split_heads"] = Field(
        "sdpa",
        description="How the MoVQ's one-head attention over every latent pixel runs (its head "
        "is too wide for flash attention): `sdpa` (what `attention` chose); `chunked`: 4096 "
        "queries at a time as two matrix products with a float32 softmax; `split_heads`: the "
        "values in heads of at most 256 sharing the full-width scores. Same images up to "
        "float rounding; which is fastest is measured by `benchmarks/device_check.sh`.",
    )
    channels_last: bool = Field(
        False,
        description="Convolution weights and activations of the UNet(s) and MoVQ in "
        "torch.channels_last memory format. Eager on an H200 it made the UNet 24% slower "
        "(GroupNorm has no channels_last kernel); under compile the norms are fused, so it is "
        "measured again there.",
    )
    cudnn_benchmark: bool = Field(
        False,
        description="`torch.backends.cudnn.benchmark`: cuDNN times its convolution algorithms "
        "for each new input shape and keeps the fastest (a job runs few shapes). Process-wide; "
        "off until measured on a GPU.",
    )
    compile: CompileConfig = Field(
        default_factory=CompileConfig, description="torch.compile settings."
    )
    tf32: bool = Field(
        True,
        description="float32 components on CUDA run matmuls and convolutions on TF32 tensor "
        "cores (torch's default is full float32 for matmuls, ~8x slower on an H100). "
        "`model.precision: reference` turns it off.",
    )
    fp8: bool = Field(
        False,
        description="The UNet's 1x1 convolutions and attention projections as row-wise scaled "
        "FP8 (E4M3) matrix products (`torch._scaled_mm`), everything else in the UNet's dtype; "
        "`model.precision: fp8` turns it on. Needs FP8 tensor cores (compute capability 8.9+: "
        "L4, L40S, H100, H200) and a bfloat16 UNet on CUDA. Changes images (each operand "
        "rounded to 3 mantissa bits): see docs/models-and-numerics.md.",
    )
