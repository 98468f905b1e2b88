"""GPU benchmark: k3batch's Kandinsky 3 path against diffusers' Kandinsky3Pipeline, same GPU
(and Kandinsky 2.2 against KandinskyV22CombinedPipeline with `--members kandinsky2.2`).

The full-size architecture (Flan-UL2 encoder 8.7B, UNet 3.1B, MoVQ 271M) is built from the
real configs with random weights (`k3batch.testing.tiny_parts.random_components`; no download), in
bfloat16, at 1024x1024. Two runs, each timed per stage (text encode, UNet loop, MoVQ decode)
and as a whole `generate()` call:

- base: 50 steps with guidance (the reference's sampler: DDIM eta=1, null-embedding
  guidance, dynamic thresholding);
- Flash: 4 steps, no guidance (same architecture, its own random UNet).

The baseline peer is diffusers' `Kandinsky3Pipeline` built from the same modules, run with
the same batch, size and UNet evaluation count (base: 50 steps at guidance 3.0; Flash: 4
steps at guidance 1.0, which diffusers runs without guidance). Model FLOPs per image are
counted with torch's FlopCounterMode on meta-device copies (eager attention, so attention
is counted as its matmuls); MFU is FLOPs / time / peak (989 TFLOP/s: H100 SXM dense bf16).
Random weights make the images noise; the arithmetic and its cost are the real model's.

Kandinsky 2.2 (`--members kandinsky2.2`, 768x768: Ikomia's default size): the prior (1.03B)
with its CLIP ViT-bigG-14 towers, the decoder UNet (1.25B) and the MoVQ (67M), built on the
GPU from the repos' architectures (`benchmarks/kandinsky22_flops.py`), against diffusers'
`KandinskyV22CombinedPipeline` on the same modules: prior 25 guided steps, decoder 100 steps
at guidance 4 (both branches), batch and seeds alike. Its `text s` column is the prior stage
(CLIP text encode + prior steps); the FLOPs leave out the zero-image CLIP embedding that
both compute once per call (under 0.1% of a batch's).

    python benchmarks/gpu_bench.py                       # CUDA, full size (~45 GB of GPU memory)
    python benchmarks/gpu_bench.py --compile             # + torch.compile of UNet and MoVQ decoder
    python benchmarks/gpu_bench.py --small               # CPU smoke run: tiny architecture, 64x64
    python benchmarks/gpu_bench.py --members kandinsky2.2  # Kandinsky 2.2 at 768x768: prior 25
                                                         # steps, decoder 100, guidance 4 (both)
    python benchmarks/gpu_bench.py --scheduler dpmsolver++ --steps 20 --no-baseline \
        --members kandinsky3                             # a diffusers solver (generation.scheduler)
    python benchmarks/gpu_bench.py --members kandisuperres-x4  # KandiSuperRes x4 of a 1024x1024
                                                         # image (benchmarks/superres_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from k3batch.model.kandinsky3 import members as k3_members

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

H100_BF16_TFLOPS = 989.0
PROMPTS = [
    "a red cat at sunset, oil painting",
    "a lighthouse on a cliff in a storm, cinematic still",
    "a blue robot reading a book in a library, 3d render",
    "a bowl of cherries on a wooden table, studio lighting",
    "an owl in a misty forest at dawn, watercolor",
    "a castle in the clouds, pixel art",
    "a golden dragon over a city at night, ukiyo-e print",
    "a violin on a windowsill in the rain, photo",
]


# What runs, each on the same modules: diffusers' pipeline eager and at its best documented
# settings (`peer_best`), k3batch eager, compiled (regional) and compiled with FP8 GEMMs.
IMPLS = ("diffusers", "diffusers-best", "k3batch", "k3batch-compiled", "k3batch-fp8")


@dataclass
class Result:
    member: str  # kandinsky3 | kandinsky3-flash | kandinsky2.2
    impl: str  # one of IMPLS
    batch: int
    seconds: float  # one batch, whole call (median over repeats)
    text: float | None = None  # per-stage seconds for the batch
    unet: float | None = None
    decode: float | None = None
    peak_gib: float | None = None
    first_call_s: float | None = None  # the warm-up call: compilation when compiled

    @property
    def images_per_second(self) -> float:
        return self.batch / self.seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny architecture on CPU, float32")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --small)")
    p.add_argument("--movq-dtype", default=None, help="MoVQ dtype; default: --dtype")
    p.add_argument("--size", type=int, default=None, help="image side; default 1024 (64 small)")
    p.add_argument("--steps", type=int, default=None, help="base steps; default 50 (10 small)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument(
        "--scheduler",
        default="reference",
        help="base sampler, a generation.scheduler name; diffusers' baseline keeps its own",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--decode-batch-size", type=int, default=None, help="default 4 (1 small), as configs"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs; default 3 (1 small)")
    p.add_argument(
        "--members",
        default="kandinsky3,kandinsky3-flash",
        help="and/or kandinsky2.2, kandisuperres-x4",
    )
    p.add_argument("--k22-size", type=int, default=None, help="2.2 image side; 768 (64 small)")
    p.add_argument("--k22-steps", type=int, default=None, help="2.2 decoder steps; 100 (4 small)")
    p.add_argument("--prior-steps", type=int, default=None, help="2.2 prior steps; 25 (2 small)")
    p.add_argument("--k22-guidance", type=float, default=4.0, help="2.2 decoder guidance")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="off by default: on an H200 it made the UNet 24%% slower and decode 2x slower",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile UNet and MoVQ decoder")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--compile-scope", choices=["regional", "whole"], default="regional")
    p.add_argument("--compile-backend", default="inductor", help="eager: CPU smoke runs")
    p.add_argument(
        "--movq-attention", default="sdpa", help="model.performance.movq_attention (k3batch)"
    )
    p.add_argument(
        "--impls",
        default="diffusers,k3batch",
        help=f"what runs, of {', '.join(IMPLS)} (compiled ones use --compile-mode)",
    )
    p.add_argument(
        "--peer-mode",
        default="default",
        help="torch.compile mode of diffusers-best (diffusers' docs use max-autotune: minutes)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip diffusers' pipeline")
    p.add_argument("--jsonl", default=None, help="append a JSON line per result here")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"for MFU; default {H100_BF16_TFLOPS:g} on CUDA, none on CPU",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    small = args.small
    args.device = args.device or ("cpu" if small else "cuda")
    args.dtype = args.dtype or ("float32" if small else "bfloat16")
    args.movq_dtype = args.movq_dtype or args.dtype
    args.size = args.size or (64 if small else 1024)
    args.steps = args.steps or (10 if small else 50)
    args.repeats = args.repeats or (1 if small else 3)
    args.decode_batch_size = args.decode_batch_size or (1 if small else 4)
    if args.peak_tflops is None and args.device.startswith("cuda"):
        args.peak_tflops = H100_BF16_TFLOPS
    args.members = args.members.split(",")
    args.impls = args.impls.split(",")
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        p.error(f"--impls: unknown {unknown}; known: {', '.join(IMPLS)}")
    if args.no_baseline:
        args.impls = [i for i in args.impls if not i.startswith("diffusers")]
    args.k22_size = args.k22_size or (64 if small else 768)  # Ikomia's default size
    args.k22_steps = args.k22_steps or (4 if small else 100)
    args.prior_steps = args.prior_steps or (2 if small else 25)
    from k3batch.model import samplers

    if args.scheduler not in samplers.NAMES:
        p.error(f"--scheduler: one of {', '.join(samplers.NAMES)}, got {args.scheduler!r}")
    return args


# ------------------------------------------------------------------ FLOPs
def flops_per_call(size: str, side: int) -> dict[str, float]:
    """FLOPs of one T5 prompt (128 tokens), one UNet sample forward, one MoVQ decode."""
    import torch
    from diffusers import Kandinsky3UNet, VQModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5EncoderModel

    from k3batch.model import performance
    from k3batch.testing import tiny_parts as tiny

    unet_cfg, movq_cfg, t5_cfg = tiny.architecture(size, len(tiny.build_tokenizer()))
    latent = side // 8
    out = {}
    with torch.device("meta"), torch.no_grad():
        unet = Kandinsky3UNet(in_channels=4, **unet_cfg)
        movq = VQModel(**movq_cfg)
        t5 = T5EncoderModel(t5_cfg)
        # Eager attention: FlopCounterMode counts its matmuls on any device.
        performance.set_attention(unet, "eager")
        performance.set_attention(movq, "eager")
        t5.set_attn_implementation("eager")
        x = torch.zeros(1, 4, latent, latent)
        context = torch.zeros(1, 128, unet_cfg["encoder_hid_dim"])
        mask = torch.ones(1, 128, dtype=torch.long)
        calls = {
            "text": lambda: t5(input_ids=torch.zeros(1, 128, dtype=torch.long)),
            "unet": lambda: unet(x, torch.tensor([999.0]), context, mask),
            "decode": lambda: movq.decode(x, force_not_quantize=True),
        }
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            out[name] = float(counter.get_total_flops())
    return out


def image_flops(
    per_call: dict, member: str, steps: int, scheduler: str = "reference"
) -> dict[str, float]:
    """Model FLOPs per image by stage (no negative prompts: T5 runs once per image)."""
    from k3batch.model import family
    from k3batch.model.schedule import base_timesteps

    if member == family.FLASH:
        unet = len(k3_members.FLASH_TIMESTEPS) * per_call["unet"]
    else:
        # The diffusers solvers run exactly `steps` steps; the reference its own spacing.
        evals = steps if scheduler != "reference" else len(base_timesteps(steps))
        unet = evals * 2 * per_call["unet"]  # cond + uncond
    stages = {"text": per_call["text"], "unet": unet, "decode": per_call["decode"]}
    return {**stages, "image": sum(stages.values())}


def sdpa_backends(device: str, dtype, side: int) -> dict[str, list[str]]:
    """Which SDPA kernels take the model's attention shapes on this GPU (the MoVQ's one
    1024-wide head over (side/8)^2 tokens is beyond flash attention's head size)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = (side // 8) ** 2
    shapes = {
        "movq mid-block (1 head x 1024)": (1, 1, tokens, 1024),
        "unet self-attention (64-wide heads)": (2, 12, tokens // 4, 64),
    }
    found = {}
    for name, shape in shapes.items():
        q = torch.randn(shape, device=device, dtype=dtype)
        found[name] = []
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
        ):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, q, q)
                found[name].append(backend.name)
            except RuntimeError:
                pass
        del q
    return found


# ------------------------------------------------------------------ timing
def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def timed_into(spent: dict, name: str, fn, device: str):
    """`fn` wrapped to add the seconds of each call to `spent[name]` (a stage's time inside a
    pipeline call)."""

    def wrapper(*a, **kw):
        out, seconds = timed(lambda: fn(*a, **kw), device)
        spent[name] += seconds
        return out

    return wrapper


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def emit(result: Result, args) -> None:
    """A result as one JSON line on stdout and in `--jsonl` (a run cut short keeps it)."""
    emit_record({**asdict(result), "images_per_second": result.images_per_second}, args)


def emit_record(record: dict, args) -> None:
    line = json.dumps({"bench": "gpu_bench", **record}, default=str)
    print(line, flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")


def bench_k3batch(model, member: str, args, impl: str = "k3batch") -> Result:
    """Whole `generate()` calls, each split into stages by timing the T5 forward (text), the
    decode, and the rest (the UNet loop), as `bench_diffusers` splits diffusers' calls."""
    from k3batch.model.kandinsky3.pipeline import Request
    from k3batch.rows.seeds import derive_seed

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    requests = [
        Request(
            p,
            None,
            derive_seed(0, str(i)),
            args.size,
            args.size,
            args.steps,
            args.guidance,
            scheduler=args.scheduler,
        )
        for i, p in enumerate(prompts)
    ]
    spent = {"text": 0.0, "decode": 0.0}
    encoder = model.text_encoder
    encoder.forward = timed_into(spent, "text", encoder.forward, args.device)
    model.decode = timed_into(spent, "decode", model.decode, args.device)
    try:
        warmup = timed(lambda: model.generate(requests), args.device)[1]  # and compilation
        print(f"  {impl} {member}: first batch (warm-up, compilation) {warmup:.1f} s", flush=True)
        for c in model.compiled:
            print(f"  {c.summary()}", flush=True)
        whole, text, decode = [], [], []
        reset_peak(args.device)
        for _ in range(args.repeats):
            spent.update(text=0.0, decode=0.0)
            whole.append(timed(lambda: model.generate(requests), args.device)[1])
            text.append(spent["text"])
            decode.append(spent["decode"])
    finally:
        del encoder.forward  # the instance attributes; the methods are back
        del model.decode
    w, t, d = (statistics.median(v) for v in (whole, text, decode))
    return Result(member, impl, args.batch_size, w, t, w - t - d, d, peak_gib(args.device), warmup)


def bench_diffusers(pipe, member: str, args, impl: str = "diffusers") -> Result:
    import torch

    from k3batch.model import family

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    flash = member == family.FLASH
    steps = len(k3_members.FLASH_TIMESTEPS) if flash else args.steps
    guidance = 1.0 if flash else args.guidance  # diffusers: guidance <= 1 runs no uncond branch
    spent = {"text": 0.0, "decode": 0.0}

    def timing(name, fn):
        return timed_into(spent, name, fn, args.device)

    def call():
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=args.size,
            width=args.size,
            generator=torch.Generator(args.device).manual_seed(0),
            output_type="np",
        )

    pipe.encode_prompt = timing("text", pipe.encode_prompt)
    pipe.movq.decode = timing("decode", pipe.movq.decode)
    try:
        warmup = timed(call, args.device)[1]  # and compilation (diffusers-best)
        whole, text, decode = [], [], []
        reset_peak(args.device)
        for _ in range(args.repeats):
            spent.update(text=0.0, decode=0.0)
            whole.append(timed(call, args.device)[1])
            text.append(spent["text"])
            decode.append(spent["decode"])
    finally:
        del pipe.encode_prompt  # the instance attributes; the methods are back
        del pipe.movq.decode
    w, t, d = (statistics.median(v) for v in (whole, text, decode))
    return Result(member, impl, args.batch_size, w, t, w - t - d, d, peak_gib(args.device), warmup)


def peer_best(unet, movq, args):
    """diffusers at its documented speed settings, on these modules: fused QKV projections,
    channels_last UNet and MoVQ, Inductor's `conv_1x1_as_mm` and `coordinate_descent_tuning`,
    and torch.compile of the UNet and the MoVQ decoder (`--peer-mode`; diffusers' guide uses
    max-autotune, minutes per shape). The compile is regional over the same blocks as
    k3batch's, as diffusers' `compile_repeated_blocks` would do if `Kandinsky3UNet` declared
    its `_repeated_blocks` (it declares none, and a whole-UNet compile did not finish in 215 s
    on an H200). QKV fusion goes through each `Attention`'s own `fuse_projections` and
    diffusers' `FusedAttnProcessor2_0`: the model-level `fuse_qkv_projections` skips this
    UNet's attention class. Returns a function that undoes all of it."""
    import torch
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    from k3batch.model import compiling, performance

    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    for m in layers:
        m.fuse_projections()
        m.set_processor(FusedAttnProcessor2_0())
    performance.to_channels_last(unet)
    performance.to_channels_last(movq)
    settings = {
        "backend": args.compile_backend,
        "mode": args.peer_mode,
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
    }
    compiled = [
        compiling.compile_model("diffusers UNet", unet, "kandinsky3_unet", settings),
        compiling.compile_model("diffusers MoVQ decoder", movq.decoder, "movq_decoder", settings),
    ]

    def undo():
        for c in compiled:
            print(f"  {c.summary()}", flush=True)
            c.restore()
        for m in layers:
            for name in ("to_qkv", "to_kv"):
                if hasattr(m, name):
                    delattr(m, name)
            m.fused_projections = False
        performance.set_attention(unet, args.attention)
        for module in (unet, movq):
            torch.nn.Module.to(module, memory_format=torch.contiguous_format)

    return undo


# ------------------------------------------------------------------ Kandinsky 2.2
K22 = "kandinsky2.2"


def k22_modules(small: bool, device: str, dtype) -> dict:
    """The 2.2 components with random weights: the tiny set's (`small`) or the real
    architectures (`benchmarks/kandinsky22_flops.py`'s constants: the prior and decoder repos'
    configs), plus the tiny set's tokenizer, prior scheduler and image processor (their sizes
    do not change the cost). `device` "meta" builds shapes only (FLOP counting)."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from benchmarks import kandinsky22_flops as arch
    from k3batch.testing import tiny_k22

    template = tiny_k22.build_prior_pipeline()
    parts = {k: template.components[k] for k in ("tokenizer", "scheduler", "image_processor")}
    if small:
        decoder = tiny_k22.build_decoder_pipeline(K22)
        parts.update(template.components, unet=decoder.unet, movq=decoder.movq)
    else:
        # Built in place on the GPU (a 5B-parameter float32 copy in host RAM is not needed).
        with torch.device(device):
            parts.update(
                prior=PriorTransformer(**arch.PRIOR),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**arch.TEXT)),
                image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.VISION)),
                unet=UNet2DConditionModel(**arch.DECODER_UNET),
                movq=VQModel(**arch.MOVQ),
            )
        if device != "meta":
            with torch.no_grad():  # clip_std at its zero init would make every embedding 0
                parts["prior"].clip_std.fill_(1.0)
    for name in ("prior", "text_encoder", "image_encoder", "unet", "movq"):
        parts[name] = torch.nn.Module.to(parts[name], device, dtype).eval()
    return parts


def flops_k22(small: bool, side: int) -> dict[str, float]:
    """FLOPs of one CLIP text encode (77 tokens), one prior forward, one decoder UNet forward
    and one MoVQ decode, counted on meta copies (eager attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from k3batch.model import performance

    parts = k22_modules(small, "meta", torch.float32)
    prior, text, unet, movq = (parts[k] for k in ("prior", "text_encoder", "unet", "movq"))
    for module in (unet, movq):
        performance.set_attention(module, "eager")
    text.set_attn_implementation("eager")
    dim = prior.config.embedding_dim
    latent = side // 8
    out = {}
    with torch.device("meta"), torch.no_grad():
        hidden = torch.zeros(1, 77, text.config.hidden_size)
        calls = {
            "text": lambda: text(input_ids=torch.zeros(1, 77, dtype=torch.long)),
            "prior": lambda: prior(
                torch.zeros(1, dim),
                timestep=torch.tensor([999]),
                proj_embedding=torch.zeros(1, dim),
                encoder_hidden_states=hidden,
                attention_mask=torch.ones(1, 77, dtype=torch.bool),
            ),
            "unet": lambda: unet(
                torch.zeros(1, 4, latent, latent),
                torch.tensor([999]),
                encoder_hidden_states=None,
                added_cond_kwargs={"image_embeds": torch.zeros(1, dim)},
            ),
            "decode": lambda: movq.decode(
                torch.zeros(1, 4, latent, latent), force_not_quantize=True
            ),
        }
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            out[name] = float(counter.get_total_flops())
    return out


def image_flops_k22(per_call: dict, args) -> dict[str, float]:
    """Model FLOPs per image: the prompt and the empty negative encoded, the prior's steps and
    the decoder's steps each with both guidance branches (prior guidance 4, decoder w > 1),
    one decode. The `text` column holds the prior stage (encode + prior steps)."""
    prior = 2 * per_call["text"] + args.prior_steps * 2 * per_call["prior"]
    unet = args.k22_steps * 2 * per_call["unet"]
    stages = {"text": prior, "unet": unet, "decode": per_call["decode"]}
    return {**stages, "image": sum(stages.values())}


def bench_k22(parts: dict, args) -> list[Result]:
    """k3batch's Kandinsky22 and diffusers' KandinskyV22CombinedPipeline on the same modules,
    same batch, size, steps and guidance. Stages: prior (text column: CLIP text encode + prior
    steps), decoder UNet steps, MoVQ decode."""
    import diffusers
    import torch

    from k3batch.model.kandinsky22.kinds import KIND_TEXT
    from k3batch.model.kandinsky22.pipeline import Kandinsky22
    from k3batch.model.request import Request
    from k3batch.rows.seeds import derive_seed
    from k3batch.testing.tiny_k22 import decoder_scheduler

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch_size)]
    prior_parts = {
        k: parts[k]
        for k in (
            "prior",
            "text_encoder",
            "image_encoder",
            "tokenizer",
            "scheduler",
            "image_processor",
        )
    }
    settings = dict(
        num_inference_steps=args.k22_steps,
        guidance_scale=args.k22_guidance,
        prior_num_inference_steps=args.prior_steps,
        prior_guidance_scale=4.0,
        height=args.size,
        width=args.size,
    )
    spent = {"text": 0.0, "decode": 0.0}
    warm_up = [None]

    def timing(name, fn):
        return timed_into(spent, name, fn, args.device)

    def measure(call, prior_call_owner, movq):
        """(median whole seconds, prior, unet, decode) over the repeats, after a warm-up
        (its seconds in `warm_up`: compilation when compiled)."""
        prior_call_owner.forward = timing("text", prior_call_owner.forward)
        movq.decode = timing("decode", movq.decode)
        try:
            warm_up[0] = timed(call, args.device)[1]
            rows = []
            reset_peak(args.device)
            for _ in range(args.repeats):
                spent.update(text=0.0, decode=0.0)
                whole = timed(call, args.device)[1]
                rows.append(
                    (whole, spent["text"], whole - spent["text"] - spent["decode"], spent["decode"])
                )
        finally:
            del prior_call_owner.forward
            del movq.decode
        return [statistics.median(r[i] for r in rows) for i in range(4)]

    results = []
    if "diffusers" in args.impls:
        pipe = diffusers.KandinskyV22CombinedPipeline(
            unet=parts["unet"],
            scheduler=decoder_scheduler(),
            movq=parts["movq"],
            **{f"prior_{k}": v for k, v in prior_parts.items()},
        )
        pipe.set_progress_bar_config(disable=True)

        def call_diffusers():
            return pipe(
                prompts,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="np",
                **settings,
            )

        # The prior stage's time: its transformer's forwards (text encode is timed with it
        # through the text encoder's forward below).
        parts["text_encoder"].forward = timing("text", parts["text_encoder"].forward)
        try:
            w, t, u, d = measure(call_diffusers, parts["prior"], parts["movq"])
        finally:
            del parts["text_encoder"].forward
        results.append(Result(K22, "diffusers", args.batch_size, w, t, u, d, peak_gib(args.device)))
        emit(results[-1], args)
        print(f"  diffusers {K22}: {results[-1].images_per_second:.3f} img/s", flush=True)
        del pipe

    prior_pipe = diffusers.KandinskyV22PriorPipeline(**prior_parts)
    decoder_parts = dict(unet=parts["unet"], scheduler=decoder_scheduler(), movq=parts["movq"])
    requests = [
        Request(
            p,
            None,
            derive_seed(0, str(i)),
            args.size,
            args.size,
            args.k22_steps,
            args.k22_guidance,
            prior_num_inference_steps=args.prior_steps,
            prior_guidance_scale=4.0,
        )
        for i, p in enumerate(prompts)
    ]
    # k3batch-fp8 last: it converts the UNet's layers in place.
    for impl in (i for i in IMPLS if i.startswith("k3batch") and i in args.impls):
        model = Kandinsky22(
            prior_pipe,
            {KIND_TEXT: diffusers.KandinskyV22Pipeline(**decoder_parts)},
            K22,
            decode_batch_size=args.decode_batch_size,
        )
        model = k3batch_optimize(model, impl, args)
        parts["text_encoder"].forward = timing("text", parts["text_encoder"].forward)
        start = time.perf_counter()
        try:
            w, t, u, d = measure(
                lambda m=model: m.generate(requests), parts["prior"], parts["movq"]
            )
            first = warm_up[0]
        finally:
            del parts["text_encoder"].forward
            for c in model.compiled:
                print(f"  {c.summary()}", flush=True)
                c.restore()
        results.append(Result(K22, impl, args.batch_size, w, t, u, d, peak_gib(args.device), first))
        emit(results[-1], args)
        print(
            f"  {impl} {K22}: {results[-1].images_per_second:.3f} img/s "
            f"(first call {first:.1f} s, all {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return results


def k3batch_optimize(model, impl: str, args):
    """`model.optimize` with the run's performance settings for k3batch implementation `impl`
    (either family's model class takes the same ones)."""
    return model.optimize(
        args.attention,
        args.channels_last,
        k3batch_compile(impl, args),
        movq_attention=args.movq_attention,
        fp8=impl == "k3batch-fp8",
    )


def k3batch_compile(impl: str, args) -> dict:
    """`model.performance.compile` of an impl: `k3batch` as the flags say, the others
    compiled (regional unless `--compile-scope`)."""
    on = args.compile or impl != "k3batch"
    return {
        "unet": on,
        "movq": on,
        "mode": args.compile_mode,
        "scope": args.compile_scope,
        "backend": args.compile_backend,
    }


# ------------------------------------------------------------------ report
def mfu(flops: float, seconds: float | None, peak_tflops: float | None) -> str:
    if not peak_tflops or not seconds:
        return "-"
    return f"{100 * flops / seconds / (peak_tflops * 1e12):.1f}%"


def report(results: list[Result], flops: dict, args) -> str:
    head = (
        f"{'member':<17} {'impl':<16} {'img/s':>8} {'s/batch':>8} {'text s':>7} {'unet s':>8} "
        f"{'decode s':>8} {'MFU text':>8} {'MFU unet':>8} {'MFU dec':>8} {'MFU img':>8} "
        f"{'peak GiB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        f, b, peak = flops[r.member], r.batch, args.peak_tflops
        lines.append(
            f"{r.member:<17} {r.impl:<16} {r.images_per_second:>8.3f} {r.seconds:>8.3f} "
            f"{r.text:>7.3f} {r.unet:>8.3f} {r.decode:>8.3f} "
            f"{mfu(f['text'] * b, r.text, peak):>8} {mfu(f['unet'] * b, r.unet, peak):>8} "
            f"{mfu(f['decode'] * b, r.decode, peak):>8} {mfu(f['image'] * b, r.seconds, peak):>8} "
            f"{'-' if r.peak_gib is None else f'{r.peak_gib:.1f}':>8}"
        )
    for member in args.members:
        by = {r.impl: r for r in results if r.member == member}
        for ours in (i for i in IMPLS if i.startswith("k3batch") and i in by):
            for peer in (i for i in IMPLS if i.startswith("diffusers") and i in by):
                ratio = by[ours].images_per_second / by[peer].images_per_second
                lines.append(f"{member}: {ours} / {peer} images/s = {ratio:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from benchmarks import superres_bench

    superres = None
    if superres_bench.MEMBER in args.members:
        # Its own run and table (another model kind: no text encoder, pixel-space windows).
        args.members = [m for m in args.members if m != superres_bench.MEMBER]
        compiled = args.compile or "k3batch-compiled" in args.impls
        superres = superres_bench.bench(
            args.small,
            args.device,
            "float32" if args.small else "float16",
            args.repeats if args.small else min(args.repeats, 2),
            (4, 1),
            args.compile_backend if compiled else None,
        )
        emit_record({"event": "superres", **superres}, args)
        print(superres_bench.report(superres, args.peak_tflops), flush=True)
        if not args.members:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"superres": superres}, f, indent=2)
            return {"superres": superres}

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import Kandinsky3Pipeline

    from k3batch.model import family
    from k3batch.model.kandinsky3.denoiser import Denoiser
    from k3batch.model.kandinsky3.pipeline import Kandinsky3
    from k3batch.model.loading import DTYPES
    from k3batch.testing.tiny_parts import random_components

    size = "tiny" if args.small else "full"
    dtype = DTYPES[args.dtype]
    k3_members = [m for m in args.members if m != K22]
    per_call_k22 = None
    k22_args = argparse.Namespace(**{**vars(args), "size": args.k22_size})
    flops = {}
    if k3_members:
        per_call = flops_per_call(size, args.size)
        flops = {m: image_flops(per_call, m, args.steps, args.scheduler) for m in k3_members}
    if K22 in args.members:
        per_call_k22 = flops_k22(args.small, args.k22_size)
        flops[K22] = image_flops_k22(per_call_k22, k22_args)
    start = time.perf_counter()
    parts = random_components(size, args.device, dtype) if k3_members else None
    if parts and args.movq_dtype != args.dtype:
        torch.nn.Module.to(parts["movq"], DTYPES[args.movq_dtype])
    k22_parts = k22_modules(args.small, args.device, dtype) if K22 in args.members else None
    build_s = time.perf_counter() - start
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({os.cpu_count()} cores)"
    )
    print(
        f"{device_name}; torch {torch.__version__}; {size} architecture, random weights built in "
        f"{build_s:.0f} s; {args.dtype} (MoVQ {args.movq_dtype}); {args.size}x{args.size}; "
        f"batch {args.batch_size}; base {args.steps} steps ({args.scheduler}), guidance "
        f"{args.guidance:g}; "
        f"attention {args.attention}, channels_last {args.channels_last}, compile {args.compile}"
        + (
            f"; {K22} at {args.k22_size}x{args.k22_size}, prior {args.prior_steps} steps, "
            f"decoder {args.k22_steps} steps, guidance {args.k22_guidance:g} (its `text s` "
            "column is the prior stage: CLIP text encode + prior steps)"
            if k22_parts
            else ""
        ),
        flush=True,
    )
    for m in args.members:
        f = flops[m]
        scale, unit = (1e12, "TFLOP") if f["image"] >= 1e12 else (1e9, "GFLOP")
        print(
            f"{m}: {f['image'] / scale:.2f} {unit}/image (text {f['text'] / scale:.2f}, "
            f"UNet {f['unet'] / scale:.2f}, decode {f['decode'] / scale:.2f})",
            flush=True,
        )
    backends = {}
    if args.device.startswith("cuda"):
        backends = sdpa_backends(args.device, dtype, args.size)
        for name, names in backends.items():
            print(f"SDPA kernels for {name}: {', '.join(names) or 'none (math fallback)'}")
    emit_record(
        {
            "event": "setup",
            "device": device_name,
            "torch": torch.__version__,
            "build_s": build_s,
            "size": args.size,
            "steps": args.steps,
            "batch": args.batch_size,
            "impls": args.impls,
            "flops_per_image": flops,
            "peak_tflops": args.peak_tflops,
            "sdpa_backends": backends,
        },
        args,
    )
    results: list[Result] = []

    # In this order, on the same modules: diffusers eager, k3batch eager and compiled (their
    # Denoiser rewires the UNet it wraps: undone before the next), diffusers at its best
    # settings, k3batch with FP8 (it converts the UNet's layers in place: last).
    pipe = None
    if k3_members and any(i.startswith("diffusers") for i in args.impls):
        pipe = Kandinsky3Pipeline(
            tokenizer=parts["tokenizer"],
            text_encoder=parts["text_encoder"],
            unet=parts["unets"][family.BASE][0],
            scheduler=parts["scheduler"],
            movq=parts["movq"],
        )
        pipe.set_progress_bar_config(disable=True)

    def run_diffusers(impl):
        undo = peer_best(pipe.unet, pipe.movq, args) if impl == "diffusers-best" else None
        try:
            for m in k3_members:
                results.append(bench_diffusers(pipe, m, args, impl))
                emit(results[-1], args)
        finally:
            if undo is not None:
                undo()

    def run_k3batch(impls):
        for m in k3_members:
            unet, null = parts["unets"][m]
            member = family.MEMBERS[m]
            denoiser = Denoiser(member, unet, null if member.guidance_scale is not None else None)
            for impl in impls:
                model = Kandinsky3(
                    parts["tokenizer"],
                    parts["text_encoder"],
                    parts["movq"],
                    {m: denoiser},
                    m,
                    decode_batch_size=args.decode_batch_size,
                )
                model = k3batch_optimize(model, impl, args)
                try:
                    results.append(bench_k3batch(model, m, args, impl))
                    emit(results[-1], args)
                finally:
                    for c in model.compiled:
                        c.restore()
            # diffusers' modules back in the UNet for the next phase.
            unet.encoder_hid_proj = denoiser.projection
            unet.add_time_condition = denoiser.pooling.pooling

    if "diffusers" in args.impls:
        run_diffusers("diffusers")
    run_k3batch([i for i in ("k3batch", "k3batch-compiled") if i in args.impls])
    if "diffusers-best" in args.impls:
        run_diffusers("diffusers-best")
    if "k3batch-fp8" in args.impls:
        run_k3batch(["k3batch-fp8"])
    pipe = None  # noqa: F841 - the pipeline's references go before the Kandinsky 2.2 run

    if k22_parts:
        results.extend(bench_k22(k22_parts, k22_args))

    print()
    print(report(results, flops, args))
    out = {
        "device": device_name,
        "torch": torch.__version__,
        "args": vars(args),
        "flops_per_image": flops,
        "flops_per_call_kandinsky2.2": per_call_k22,
        "sdpa_backends": backends,
        "results": [{**asdict(r), "images_per_second": r.images_per_second} for r in results],
        "superres": superres,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
