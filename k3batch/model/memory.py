"""GPU memory a k3batch actor needs: weights, peak activations and a margin; the shared
method. Each family estimates its own actors (`<family>/memory.py`), `estimates.py` gathers a
job's or a Serve app's.

Weights: parameter counts of the real architectures (built on the meta device: no memory,
about a second each, cached) x bytes of each component's configured dtype, for the
components that sit on the GPU only.

Activations: scaled from two measurements on an H200 (full-size random weights, bfloat16,
SDPA attention, 1024x1024, batch 4 with guidance = UNet batch 8; all weights 28.1 GiB):
  - decode_batch_size 1: peak allocated 33.5 GiB, so ~5.5 GiB for the UNet at batch 8 (or
    one decode, whichever is larger);
  - decode_batch_size 4: peak 48.5 GiB, so ~20.5 GiB for a MoVQ decode of 4 images.
Both scale linearly with pixels and batch (SDPA keeps attention memory linear in tokens)
and with the activations' bytes (float32 doubles them). The phases run one after the other
(encode, sample, decode) and the allocator reuses freed blocks, so the peak is the largest
phase, not the sum.

Margin: the CUDA context and cuBLAS/cuDNN workspaces (~1.5 GiB) plus 10% of the rest for the
caching allocator's fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MEGAPIXEL = 1024 * 1024
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Calibration (H200, bfloat16, 1024x1024; see the module docstring).
UNET_GIB_AT_BATCH_8 = 5.5
DECODE_GIB_PER_IMAGE = 20.5 / 4
CONTEXT_GIB = 1.5
MARGIN = 0.10

# GPU memory as torch sees it (`total_memory`), a little under the marketing size.
GPU_GIB = {
    "H100 80GB": 79.6,  # 81559 MiB, measured on the GPU test machine
    "A10G 24GB": 22.0,  # 23028 MiB by nvidia-smi, less the driver's reserve
}
DEFAULT_GPU = "H100 80GB"


@dataclass(frozen=True)
class MemoryEstimate:
    """GPU memory of one actor, in GiB per named part (the parts sum to the total)."""

    actor: str
    parts: tuple[tuple[str, float], ...]

    @property
    def total_gib(self) -> float:
        return sum(gib for _, gib in self.parts)

    def part(self, prefix: str) -> float:
        """GiB of the parts whose name starts with `prefix` (0 when none)."""
        return sum(gib for name, gib in self.parts if name.startswith(prefix))

    def summary(self) -> str:
        items = ", ".join(f"{name} {gib:.1f}" for name, gib in self.parts)
        return f"{self.actor}: ~{self.total_gib:.1f} GiB ({items})"

    def fits(self, gib: float) -> bool:
        return self.total_gib <= gib

    def problem(self, gib: float, where: str) -> str | None:
        """None when it fits `gib`; else a one-line message naming the parts."""
        if self.fits(gib):
            return None
        return f"{self.summary()} does not fit {where} ({gib:.1f} GiB)"


def on_gpu(device: str) -> bool:
    # `auto` is CUDA in an actor that was given a GPU, which is the actor estimated here.
    return device != "cpu"


def weights_gib(parameters: int, dtype: str) -> float:
    return parameters * BYTES[dtype] / GIB


def unet_activations_gib(samples: int, pixels: int, dtype: str) -> float:
    return UNET_GIB_AT_BATCH_8 * samples / 8 * pixels / MEGAPIXEL * BYTES[dtype] / 2


def decode_activations_gib(images: int, pixels: int, dtype: str) -> float:
    return DECODE_GIB_PER_IMAGE * images * pixels / MEGAPIXEL * BYTES[dtype] / 2


def with_margin(actor: str, parts: list[tuple[str, float]]) -> MemoryEstimate:
    rest = sum(gib for _, gib in parts)
    parts.append(("CUDA context and allocator margin", CONTEXT_GIB + MARGIN * rest))
    return MemoryEstimate(actor, tuple(parts))


@dataclass(frozen=True)
class ActorMemory:
    """An actor kind of a job, the GPUs it asks Ray for, and its estimate."""

    estimate: MemoryEstimate
    gpus: float

    def problem(self, gpu_gib: float, gpu_name: str = "the GPU") -> str | None:
        share = "" if self.gpus == 1 else f"{self.gpus:g} x "
        return self.estimate.problem(self.gpus * gpu_gib, f"{share}{gpu_name}")
