"""GPU memory a k3batch actor needs for a config: weights, peak activations and a margin.

Weights: parameter counts of the real architectures (built on the meta device: no memory,
about a second each, cached) x bytes of each component's configured dtype, for the
components that sit on the GPU only: T5 unless the text encoder pool has it or the device
map puts it on the CPU, one UNet per member the job loads (Flash too when `model.refine`),
and MoVQ.

Activations: scaled from two measurements on an H200 (full-size random weights, bfloat16,
SDPA attention, 1024x1024, batch 4 with guidance = UNet batch 8; all weights 28.1 GiB):
  - decode_batch_size 1: peak allocated 33.5 GiB, so ~5.5 GiB for the UNet at batch 8 (or
    one decode, whichever is larger);
  - decode_batch_size 4: peak 48.5 GiB, so ~20.5 GiB for a MoVQ decode of 4 images.
Both scale linearly with pixels and batch (SDPA keeps attention memory linear in tokens)
and with the activations' bytes (float32 doubles them). The phases run one after the other
(encode, sample, decode) and the allocator reuses freed blocks, so the peak is the largest
phase, not the sum. The T5 activations are a formula (tokens x widths), not measured: they
are small beside the rest.

Conditioning (Kandinsky 3 base): the ControlNet (`model.controlnet`: a copy of the UNet's
first three encoder levels, ~1.2B parameters) and the IP-Adapter (`model.ip_adapter`: its
projections, ~0.5B, plus the CLIP ViT-L/14 image encoder, ~0.3B) are counted on meta like
the UNet. Not measured: with the ControlNet the UNet phase is taken as twice the UNet's own
activations, an upper bound (the ControlNet runs a part of the UNet's encoder before it and
hands on residuals the size of the skips the UNet holds anyway); the image tokens (4 per
row) add nothing worth counting.

Upscaling actors (`upscale:`, KandiSuperRes): counted, not measured on a GPU
(`scripts/sr_flash_memory.py`: the full-size architectures on meta under a live-tensor
counter, checked against real CPU forwards): the SR UNet's activations are 1.19 GiB per
megapixel of UNet input in float16 (it has no attention and no guidance batch), for
`max_tiles_per_call` windows per call (x4, x2; Flash x2 above `flash_whole_canvas_side`) or
the whole canvas (Flash x2 below it); its float32 canvases (x, noise, the upsampled input)
for every image of a batch; Flash x2 adds the Flash UNet and MoVQ weights, a 1024 px MoVQ
tile (encode 5, decode 10 GiB in float32) and the refine's tiles (1.0 GiB per 352-latent
tile in float16).

Kandinsky 2.2 members: parameter counts from the Hub repos' float16 weight files (bytes / 2,
rounded; not built, to keep the estimate free of downloads), `K22_PARAMS`. Their activations
use the Kandinsky 3 formulas above, an upper bound: the 1.2B decoder UNet is smaller than the
3B one at the same latent size, and the prior works on 77 tokens and one embedding.

Margin: the CUDA context and cuBLAS/cuDNN workspaces (~1.5 GiB) plus 10% of the rest for the
caching allocator's fragmentation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

GIB = 1024**3
MEGAPIXEL = 1024 * 1024
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Calibration (H200, bfloat16, 1024x1024; see the module docstring).
UNET_GIB_AT_BATCH_8 = 5.5
DECODE_GIB_PER_IMAGE = 20.5 / 4
CONTEXT_GIB = 1.5
MARGIN = 0.10
TEXT_TOKENS = 128  # the encoder runs on 128 positions whatever the prompt

# Kandinsky 2.2 parameter counts (see the module docstring): prior transformer, its CLIP
# ViT-bigG text and image towers, the decoder UNet (inpainting and ControlNet alike), MoVQ,
# and Intel/dpt-large for depth.
K22_PARAMS = {
    "prior": 1_020_000_000,
    "text_encoder": 695_000_000,
    "image_encoder": 1_845_000_000,
    "unet": 1_225_000_000,
    "movq": 67_000_000,
    "depth_estimator": 343_000_000,
}

# KandiSuperRes (counted; see the module docstring).
SR_GIB_PER_MEGAPIXEL = 1.19  # SR UNet activations per megapixel of input, float16
SR_CANVASES = 3  # float32 canvases per image: x, its noise, the upsampled input
MOVQ_TILE_GIB = {"encode": 5.0, "decode": 10.0}  # one 1024 px tile, float32
REFINE_GIB_PER_TILE = 1.0  # the Flash refine's UNet per 352-latent tile, float16

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


@functools.cache
def parameter_counts() -> dict[str, int]:
    """Parameters of the real components: text_encoder, movq, unet (4-in), unet9 (inpaint),
    controlnet, ip_adapter (its own weights) and image_encoder (CLIP ViT-L/14 vision)."""
    import torch
    from diffusers import VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, T5EncoderModel

    from k3batch.model import family
    from k3batch.model.adapters import controlnet, ip_adapter
    from k3batch.model.kandinsky3.loading import full_architecture, unet_class
    from k3batch.model.superres.sr_unet import SR_UNET, SRUNet

    unet_config, movq_config, t5_config = full_architecture()

    def base_unet():
        return unet_class(family.MEMBERS[family.BASE])(in_channels=4, **unet_config)

    # openai/clip-vit-large-patch14's vision tower and projection.
    clip = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=ip_adapter.IMAGE_EMBED_DIM,
    )
    builders = {
        "text_encoder": lambda: T5EncoderModel(t5_config),
        "movq": lambda: VQModel(**movq_config),
        "unet": base_unet,
        "unet9": lambda: unet_class(family.MEMBERS[family.INPAINT])(**unet_config),
        "controlnet": lambda: controlnet.Kandinsky3ControlNet(**controlnet.REAL_CONFIG),
        "ip_adapter": lambda: ip_adapter.IPAdapter(base_unet()),
        "image_encoder": lambda: CLIPVisionModelWithProjection(clip),
        "sr_unet": lambda: SRUNet(**SR_UNET),
    }
    counts = {}
    for name, build in builders.items():
        # Meta tensors have shapes and no storage: the 8.7B T5 costs nothing to build.
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build().parameters())
    return counts


def _on_gpu(device: str) -> bool:
    # `auto` is CUDA in an actor that was given a GPU, which is the actor estimated here.
    return device != "cpu"


def _weights_gib(component: str, dtype: str) -> float:
    return parameter_counts()[component] * BYTES[dtype] / GIB


def _unet_activations_gib(samples: int, pixels: int, dtype: str) -> float:
    return UNET_GIB_AT_BATCH_8 * samples / 8 * pixels / MEGAPIXEL * BYTES[dtype] / 2


def _decode_activations_gib(images: int, pixels: int, dtype: str) -> float:
    return DECODE_GIB_PER_IMAGE * images * pixels / MEGAPIXEL * BYTES[dtype] / 2


def _text_activations_gib(prompts: int, dtype: str) -> float:
    from k3batch.model.kandinsky3.loading import FULL_T5

    t5 = FULL_T5
    # Per token and layer: residual, q/k/v/o and norm outputs (~6 x d_model), the gated
    # feed-forward's two inputs and product (3 x d_ff), one row of attention scores per head.
    per_token = 6 * t5["d_model"] + 3 * t5["d_ff"] + t5["num_heads"] * TEXT_TOKENS
    return prompts * TEXT_TOKENS * per_token * BYTES[dtype] / GIB


def _with_margin(actor: str, parts: list[tuple[str, float]]) -> MemoryEstimate:
    rest = sum(gib for _, gib in parts)
    parts.append(("CUDA context and allocator margin", CONTEXT_GIB + MARGIN * rest))
    return MemoryEstimate(actor, tuple(parts))


def generation_estimate(
    model,
    *,
    batch_size: int,
    width: int,
    height: int,
    decode_batch_size: int = 1,
    text_encoder_pool: bool = False,
    actor: str = "generation actor",
) -> MemoryEstimate:
    """GPU memory of a generation actor (or Serve replica) running `model` (a ModelConfig).

    `batch_size` rows per UNet call at `width` x `height` (use the largest size a row may ask
    for); `text_encoder_pool`: T5 runs in its own pool, not here.
    """
    from k3batch.model import family

    dtypes, devices = model.dtype.model_dump(), model.device_map()
    parts: list[tuple[str, float]] = []
    pixels = width * height
    peaks: list[tuple[str, float]] = []
    member = family.MEMBERS[model.name]
    guided = member.guided
    if member.family == family.KANDINSKY22:
        return _kandinsky22_estimate(
            model, member, batch_size, width, height, decode_batch_size, actor
        )
    if not text_encoder_pool and _on_gpu(devices["text_encoder"]):
        dt = dtypes["text_encoder"]
        parts.append((f"T5 encoder weights ({dt})", _weights_gib("text_encoder", dt)))
        prompts = batch_size * (2 if guided else 1)
        peaks.append((f"T5 at {prompts} prompts", _text_activations_gib(prompts, dt)))
    if _on_gpu(devices["unet"]):
        dt = dtypes["unet"]
        for m in family.members_needed(model.name, model.refine):
            count = "unet9" if m.in_channels != 4 else "unet"
            parts.append((f"UNet {m.name} weights ({dt})", _weights_gib(count, dt)))
        if model.controlnet:
            parts.append((f"ControlNet weights ({dt})", _weights_gib("controlnet", dt)))
        if model.ip_adapter is not None:
            parts.append((f"IP-Adapter weights ({dt})", _weights_gib("ip_adapter", dt)))
            parts.append((f"CLIP image encoder weights ({dt})", _weights_gib("image_encoder", dt)))
        samples = batch_size * (2 if guided else 1)
        unet = _unet_activations_gib(samples, pixels, dt)
        what = f"UNet at batch {samples}, {width}x{height}"
        if model.controlnet:
            unet, what = 2 * unet, f"UNet + ControlNet at batch {samples}, {width}x{height}"
        peaks.append((what, unet))
    if _on_gpu(devices["movq"]):
        dt = dtypes["movq"]
        parts.append((f"MoVQ weights ({dt})", _weights_gib("movq", dt)))
        images = min(decode_batch_size, batch_size)
        peaks.append(
            (
                f"MoVQ decode of {images} at {width}x{height}",
                _decode_activations_gib(images, pixels, dt),
            )
        )
    if peaks:
        name, gib = max(peaks, key=lambda p: p[1])
        parts.append((f"activations ({name})", gib))
    return _with_margin(actor, parts)


def _kandinsky22_estimate(
    model, member, batch_size, width, height, decode_batch_size, actor
) -> MemoryEstimate:
    """A Kandinsky 2.2 actor: prior (with its CLIP towers), decoder UNet, MoVQ, and the
    depth estimator when the config names one; activations as Kandinsky 3's (an upper bound)."""
    dtypes, devices = model.dtype.model_dump(), model.device_map()
    components = ["prior", "text_encoder", "image_encoder", "unet", "movq"]
    if model.depth_estimator:
        components.append("depth_estimator")
    parts = [
        (f"{c} weights ({dtypes[c]})", K22_PARAMS[c] * BYTES[dtypes[c]] / GIB)
        for c in components
        if _on_gpu(devices[c])
    ]
    pixels, peaks = width * height, []
    if _on_gpu(devices["unet"]):
        samples = batch_size * 2  # guidance on at the default scale
        unet = _unet_activations_gib(samples, pixels, dtypes["unet"])
        peaks.append((f"UNet at batch {samples}, {width}x{height}", unet))
    if _on_gpu(devices["movq"]):
        images = min(decode_batch_size, batch_size)
        decode = _decode_activations_gib(images, pixels, dtypes["movq"])
        peaks.append((f"MoVQ decode of {images} at {width}x{height}", decode))
    if peaks:
        name, gib = max(peaks, key=lambda p: p[1])
        parts.append((f"activations ({name})", gib))
    return _with_margin(actor, parts)


def upscale_estimate(upscale, actor: str = "upscaling actor") -> MemoryEstimate:
    """GPU memory of an upscaling actor (or Serve replica) running `upscale` (an
    UpscaleConfig) on images up to `upscale.max_output_side`."""
    dt = upscale.dtype or "float16"  # null: float16 on a GPU
    side = upscale.max_output_side
    canvas = side * side
    windows = min(upscale.max_tiles_per_call * upscale.window**2, canvas)
    flash = upscale.model == "flash-x2"
    whole = flash and side <= upscale.flash_whole_canvas_side
    parts = [(f"SR UNet weights ({dt})", _weights_gib("sr_unet", dt))]
    images = upscale.batch_size
    parts.append(
        (
            f"float32 canvases of {images} images at {side}x{side}",
            images * SR_CANVASES * 3 * 4 * canvas / GIB,
        )
    )
    pixels = canvas if whole else windows
    what = "the whole canvas" if whole else f"{upscale.max_tiles_per_call} windows"
    sr = SR_GIB_PER_MEGAPIXEL * pixels / MEGAPIXEL * BYTES[dt] / 2
    peaks = [(f"SR UNet on {what}, {side}x{side}", sr)]
    if flash:
        parts.append((f"Flash UNet weights ({dt})", _weights_gib("unet", dt)))
        parts.append(("MoVQ weights (float32)", _weights_gib("movq", "float32")))
        peaks.append(("MoVQ decode of a 1024 px tile", MOVQ_TILE_GIB["decode"]))
        tiles = upscale.max_tiles_per_call
        refine = REFINE_GIB_PER_TILE * tiles * BYTES[dt] / 2
        peaks.append((f"Flash refine of {tiles} tiles", refine))
    name, gib = max(peaks, key=lambda p: p[1])
    parts.append((f"activations ({name})", gib))
    return _with_margin(actor, parts)


def text_encoder_estimate(
    model, *, batch_size: int, actor: str = "text encoder actor"
) -> MemoryEstimate:
    """GPU memory of a text encoder pool actor: T5 and `batch_size` rows (with negatives)."""
    from k3batch.model import family

    dt = model.dtype.text_encoder
    guided = family.MEMBERS[model.name].guided
    prompts = batch_size * (2 if guided else 1)
    parts = [
        (f"T5 encoder weights ({dt})", _weights_gib("text_encoder", dt)),
        (f"activations (T5 at {prompts} prompts)", _text_activations_gib(prompts, dt)),
    ]
    return _with_margin(actor, parts)


@dataclass(frozen=True)
class ActorMemory:
    """An actor kind of a job, the GPUs it asks Ray for, and its estimate."""

    estimate: MemoryEstimate
    gpus: float

    def problem(self, gpu_gib: float, gpu_name: str = "the GPU") -> str | None:
        share = "" if self.gpus == 1 else f"{self.gpus:g} x "
        return self.estimate.problem(self.gpus * gpu_gib, f"{share}{gpu_name}")


def job_estimates(cfg, kind) -> list[ActorMemory]:
    """The GPU actors of a batch job (a JobConfig, and its `job.kinds.JobKind`): generation,
    and the T5 pool if enabled.

    Rows may ask for any size up to `limits.max_side`, so the estimate takes the largest.
    """
    if not kind.uses_diffusion_model:
        return upscale_estimates(cfg)
    r, g = cfg.resources, cfg.generation
    pool = r.text_encoder_pool
    side = max(g.width, g.height, cfg.limits.max_side)
    out = []
    if r.num_gpus_per_actor > 0:
        est = generation_estimate(
            cfg.model,
            batch_size=r.batch_size,
            width=side,
            height=side,
            decode_batch_size=r.decode_batch_size,
            text_encoder_pool=pool.enabled,
        )
        out.append(ActorMemory(est, r.num_gpus_per_actor))
    if pool.enabled and pool.num_gpus_per_actor > 0:
        est = text_encoder_estimate(cfg.model, batch_size=pool.batch_size)
        out.append(ActorMemory(est, pool.num_gpus_per_actor))
    return out + upscale_estimates(cfg)


def upscale_estimates(cfg) -> list[ActorMemory]:
    """The upscaling pool of a job (an `upscale:` step or `job: upscale`) when it has GPUs."""
    u = cfg.upscale
    if not u.enabled or u.num_gpus_per_actor <= 0:
        return []
    return [ActorMemory(upscale_estimate(u), u.num_gpus_per_actor)]


def serve_estimates(app) -> list[ActorMemory]:
    """The GPU replicas of a Serve application (a ServeAppConfig)."""
    side = app.limits.max_side
    deployments = [("generator", app.model, app.generator, app.generation)]
    if app.inpaint_model is not None:
        deployments.append(
            ("inpaint generator", app.inpaint_model, app.inpaint_generator, app.inpaint_generation)
        )
    out = []
    for actor, model, deployment, gen in deployments:
        if deployment.num_gpus <= 0:
            continue
        s = max(side, gen.width, gen.height)
        est = generation_estimate(
            model,
            batch_size=app.batching.max_batch_size,
            width=s,
            height=s,
            decode_batch_size=deployment.decode_batch_size,
            actor=f"{actor} replica",
        )
        out.append(ActorMemory(est, deployment.num_gpus))
    if app.upscale is not None and app.upscaler.num_gpus > 0:
        est = upscale_estimate(app.upscale, actor="upscaler replica")
        out.append(ActorMemory(est, app.upscaler.num_gpus))
    return out
