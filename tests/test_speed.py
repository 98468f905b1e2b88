"""The GPU speed settings on CPU: regional compile, FP8 GEMMs, the MoVQ attention kinds.

What they buy is measured on a GPU (`benchmarks/device_check.sh`); here each is checked for
giving the plain path's images (FP8: its numerics) and for doing what it says: every block
compiled, no recompile across timesteps, a fall-back logged. Compiling uses Dynamo's `eager`
backend (capture without code generation) except in the tests marked slow, which run
Inductor's CPU backend (C++ compiles: minutes on a small CPU).
"""

import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from k3batch.config import ModelConfig
from k3batch.model import compiling, fp8, movq_attention
from k3batch.model.kandinsky3.pipeline import Request

from .conftest import FP32, LATENT_ATOL, assert_same_images, load_tiny

ROWS = [
    Request("a red cat at sunset", None, 1, 64, 64, 3, 3.0),
    Request("owl", "a dark forest", 2, 64, 64, 3, 3.0),
]


@pytest.fixture(scope="module")
def plain(tiny_dir):
    model = load_tiny(tiny_dir)
    latents = model.sample(ROWS)
    return model, latents, model.decode(latents)


def cache_entries(cls) -> int:
    """Graphs Dynamo holds for a class's forward (all its instances share the code)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(cls.forward.__code__))


# ------------------------------------------------------------ regional compile
def test_regional_compile_runs_every_block_compiled_and_gives_the_eager_images(
    tiny_dir, plain, caplog
):
    from diffusers.models.unets.unet_kandinsky3 import (
        Kandinsky3AttentionBlock,
        Kandinsky3ResNetBlock,
    )
    from torch._dynamo.utils import counters

    _, latents, images = plain
    torch._dynamo.reset()
    counters.clear()
    model = load_tiny(
        tiny_dir, performance={"compile": {"unet": True, "movq": True, "backend": "eager"}}
    )
    unet, movq = model.compiled
    # The UNet's ResNet and attention blocks, the decoder's mid and up blocks, each compiled.
    assert len(unet.blocks) == 36 and len(movq.blocks) == 5
    assert unet.blocks[0].module.forward is unet.blocks[0]
    with caplog.at_level(logging.INFO, logger="k3batch.model.performance"):
        model.warm_up(64, 64, 2)
    lines = [r.getMessage() for r in caplog.records if "regional compile" in r.getMessage()]
    assert lines == [
        "kandinsky3 UNet: regional compile: 36 of 36 blocks run compiled (14 graphs; "
        "Kandinsky3ResNetBlock x24, Kandinsky3AttentionBlock x12), 0 eager; Dynamo recompile "
        f"limit {unet.recompile_limit}",
        "MoVQ decoder: regional compile: 5 of 5 blocks run compiled (5 graphs; "
        "AttnUpDecoderBlock2D x1, UpDecoderBlock2D x3, UNetMidBlock2D x1), 0 eager; Dynamo "
        f"recompile limit {movq.recompile_limit}",
    ]
    # 9 ResNet shapes: more than Dynamo's default limit of 8, raised to fit.
    assert cache_entries(Kandinsky3ResNetBlock) == 9 and unet.recompile_limit >= 9
    assert cache_entries(Kandinsky3AttentionBlock) == 5

    other = model.sample(ROWS)
    torch.testing.assert_close(other, latents, atol=LATENT_ATOL, rtol=0)
    assert_same_images(model.decode(other), images)
    # No recompile across timesteps or prompts: another generation, 6 steps, new prompts,
    # runs on the graphs the warm-up made.
    graphs = counters["stats"]["unique_graphs"]
    model.sample([Request(p, None, 7, 64, 64, 6, 3.0) for p in ("a castle", "a red owl")])
    assert counters["stats"]["unique_graphs"] == graphs == 19
    assert cache_entries(Kandinsky3ResNetBlock) == 9
    for c in model.compiled:
        c.restore()
    assert "forward" not in unet.blocks[0].module.__dict__


class _Widths(nn.Module):
    """Blocks of one class at 12 widths: 12 graphs of one code object."""

    def __init__(self, block):
        super().__init__()
        self.blocks = nn.ModuleList(block(8 + 4 * i) for i in range(12))

    def forward(self, x):
        return [b(x[..., : b.width]) for b in self.blocks]


class _Scale(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return torch.nn.functional.silu(x * self.weight) + 1


class _ScaleToo(_Scale):
    def forward(self, x):
        return torch.nn.functional.silu(x * self.weight) + 1


def test_more_block_shapes_than_dynamos_limit_all_run_compiled():
    torch._dynamo.reset()
    x = torch.randn(2, 64)
    # What plain per-block compile does: past the 8th shape the blocks silently run eager.
    control = _Widths(_ScaleToo)
    with torch._dynamo.config.patch(recompile_limit=8):
        for b in control.blocks:
            b.forward = torch.compile(b.forward, backend="eager", dynamic=False)
        control(x)
    assert cache_entries(_ScaleToo) == 8

    model = _Widths(_Scale)
    expected = model(x)
    region = compiling.compile_model("widths", model, ("_Scale",), {"backend": "eager"})
    with torch._dynamo.config.patch(recompile_limit=8):
        out = model(x)
        assert torch._dynamo.config.recompile_limit >= 12
    assert cache_entries(_Scale) == 12
    assert region.counts() | {"recompile_limit": None} == {
        "blocks": 12,
        "compiled": 12,
        "eager": 0,
        "not_run": 0,
        "graphs": 12,
        "classes": {"_Scale": 12},
        "recompile_limit": None,
        "eager_blocks": {},
    }
    for a, b in zip(out, expected, strict=True):
        torch.testing.assert_close(a, b)


class _Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        torch._dynamo.graph_break()
        return y * 2


class _TwoKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _Scale(4)
        self.b = _Breaks()

    def forward(self, x):
        return self.b(self.a(x))


def test_a_block_that_cannot_compile_runs_eager_and_the_log_says_so(caplog):
    torch._dynamo.reset()
    model = _TwoKinds()
    x = torch.randn(3, 4)
    expected = model(x)
    region = compiling.compile_model("two", model, ("_Scale", "_Breaks"), {"backend": "eager"})
    assert "0 of 2 blocks run compiled" in region.summary()
    assert "2 not run yet" in region.summary()
    with caplog.at_level(logging.WARNING, logger="k3batch.model.compiling"):
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x), expected)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("two: block b runs eager: Unsupported")
    summary = region.summary()
    assert "1 of 2 blocks run compiled" in summary and ", 1 eager (b: Unsupported" in summary


def test_whole_scope_compiles_the_module_in_one_call(tiny_dir):
    model = load_tiny(
        tiny_dir,
        performance={"compile": {"unet": True, "scope": "whole", "backend": "eager"}},
    )
    assert model.unet._compiled_call_impl is not None
    assert [c.summary() for c in model.compiled] == [
        "kandinsky3 UNet: compiled whole (one region; graph breaks split it silently)"
    ]
    with pytest.raises(ValueError, match="compile.scope: one of regional, whole, got 'blocks'"):
        compiling.compile_model("x", nn.Linear(2, 2), "sr_unet", {"scope": "blocks"})


def test_inductor_options_carry_the_mode_and_the_switches():
    assert compiling.inductor_options({}) == {}
    assert compiling.inductor_options(
        {"mode": "max-autotune", "conv_1x1_as_mm": True, "coordinate_descent_tuning": False}
    ) == {
        "max_autotune": True,
        "triton.cudagraphs": True,
        "coordinate_descent_tuning": True,
        "conv_1x1_as_mm": True,
    }
    # torch.compile refuses a mode beside options: Inductor gets the options alone.
    kwargs = compiling.compile_kwargs({"mode": "reduce-overhead"}, fullgraph=True, dynamic=False)
    assert kwargs == {
        "backend": "inductor",
        "fullgraph": True,
        "dynamic": False,
        "options": {"triton.cudagraphs": True},
    }
    assert compiling.compile_kwargs(
        {"backend": "eager", "mode": "default"}, fullgraph=True, dynamic=False
    ) == {"backend": "eager", "fullgraph": True, "dynamic": False}


def test_the_other_models_blocks_compile_regionally_too():
    """Kandinsky 2.2's UNet and the SR UNet, each through its own block list."""
    from k3batch.model.superres.sr_unet import TINY_SR_UNET, SRUNet
    from k3batch.testing import tiny_k22

    torch._dynamo.reset()
    unet = tiny_k22.build_decoder_pipeline("kandinsky2.2").unet.eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    emb = {"image_embeds": torch.randn(2, unet.config.encoder_hid_dim)}
    sr = SRUNet(**TINY_SR_UNET).eval()
    xs, lowres = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = unet(x, t, None, added_cond_kwargs=emb).sample
        sr_expected = sr(xs, torch.tensor([500.0]), lowres)
        k22 = compiling.compile_model("k22", unet, "kandinsky22_unet", {"backend": "eager"})
        region = compiling.compile_model("sr", sr, "sr_unet", {"backend": "eager"})
        torch.testing.assert_close(unet(x, t, None, added_cond_kwargs=emb).sample, expected)
        torch.testing.assert_close(sr(xs, torch.tensor([500.0]), lowres), sr_expected)
    for r in (k22, region):
        c = r.counts()
        assert c["compiled"] == c["blocks"] > 0 and c["eager"] == 0, r.summary()
    assert set(k22.counts()["classes"]) == {"ResnetBlock2D", "Attention"}
    assert set(region.counts()["classes"]) == {"ResBlock"}


@pytest.mark.slow
def test_inductor_compiled_blocks_give_the_eager_images(tiny_dir, tmp_path, monkeypatch):
    """Inductor's CPU backend on the tiny model (C++ kernels; minutes on a 2-core CPU)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    rows = [Request("a red cat at sunset", None, 1, 32, 32, 2, 3.0)]
    plain = load_tiny(tiny_dir)
    latents = plain.sample(rows)
    model = load_tiny(tiny_dir, performance={"compile": {"unet": True, "movq": True}})
    other = model.sample(rows)
    torch.testing.assert_close(other, latents, atol=LATENT_ATOL, rtol=0)
    assert_same_images(model.decode(other), plain.decode(latents))
    for c in model.compiled:
        counts = c.counts()
        assert counts["compiled"] == counts["blocks"] and counts["eager"] == 0, c.summary()


_ARTIFACTS_SCRIPT = """
import json, sys, torch
from torch._dynamo.utils import counters
from k3batch.model import compiling

mode, path = sys.argv[1], sys.argv[2]
if mode == "load":
    assert compiling.load_artifacts(path)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(2)])
region = compiling.compile_model("seq", model, ("Linear",), {})
model(torch.randn(4, 16))
if mode == "save":
    assert compiling.save_artifacts(path) > 0
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_compile_artifacts_let_a_fresh_process_skip_kernel_generation(tmp_path):
    """One process compiles (Inductor, CPU) and saves torch.compiler's artifacts; another,
    with an empty Inductor cache of its own, loads them and generates no kernel: every
    compiled graph is a cache hit."""
    import json

    path = str(tmp_path / "artifacts" / "model.bin")

    def run(mode, cache):
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache),
            "PYTHONPATH": os.getcwd(),
        }
        proc = subprocess.run(
            [sys.executable, "-c", _ARTIFACTS_SCRIPT, mode, path],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run("save", "first")
    assert first["fxgraph_cache_miss"] >= 1 and first.get("fxgraph_cache_hit", 0) == 0
    second = run("load", "second")
    assert second["fxgraph_cache_hit"] == first["fxgraph_cache_miss"]
    assert second.get("fxgraph_cache_miss", 0) == 0


def test_the_actor_names_one_artifacts_file_per_model_and_shape(tmp_path):
    a = compiling.artifacts_file(str(tmp_path), {"model": {"name": "x"}, "warmup": {"w": 1}})
    b = compiling.artifacts_file(str(tmp_path), {"model": {"name": "x"}, "warmup": {"w": 2}})
    assert a != b and os.path.dirname(a) == str(tmp_path / "artifacts")
    assert not compiling.load_artifacts(a)  # none yet: the actor compiles, then saves


# ------------------------------------------------------------ FP8
def test_fp8_gemm_is_the_scaled_product_of_its_quantised_operands():
    """torch's CPU `_scaled_mm` runs E4M3 with row-wise scales (torch 2.13): the layer's
    output is exactly the product of the dequantised operands, and within E4M3's rounding
    of the float product."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 7, 64, generator=g) * torch.logspace(-2, 2, 64)  # outlier columns
    layer = fp8.FP8Linear(linear)
    out = layer(x)
    assert out.shape == (5, 7, 48) and out.dtype == torch.float32

    rows = x.reshape(-1, 64)
    xq, xs = fp8.quantize_rows(rows)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (35, 1)
    # Each row's largest magnitude lands on E4M3's largest value.
    assert torch.equal(xq.float().abs().amax(dim=1), torch.full((35,), fp8.E4M3_MAX))
    dequantised = (xq.float() * xs) @ (layer.weight_q.float() * layer.weight_scale).T
    torch.testing.assert_close(out.reshape(-1, 48), dequantised + linear.bias, atol=1e-5, rtol=1e-5)
    ref = linear(x).detach()
    error = float((out.detach() - ref).norm() / ref.norm())
    assert 1e-3 < error < 0.06  # 3 mantissa bits: ~2-4% per product, not float rounding


def test_fp8_conv1x1_keeps_the_memory_format_and_matches_the_convolution():
    conv = nn.Conv2d(32, 48, 1)
    layer = fp8.FP8Conv1x1(conv)
    x = torch.randn(2, 32, 5, 6)
    out, ref = layer(x), conv(x)
    assert out.is_contiguous() and float((out - ref).norm() / ref.norm()) < 0.06
    cl = layer(x.to(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, out)


def test_fp8_converts_the_unets_1x1_convolutions_and_attention_linears(tiny_dir, plain):
    _, latents, images = plain
    model = load_tiny(tiny_dir, performance={"fp8": True})
    unet = model.unet
    kinds = {type(m).__name__ for m in unet.modules()}
    assert {"FP8Conv1x1", "FP8Linear"} <= kinds
    # Attention projections converted; 3x3 convolutions and the time MLP stay.
    assert isinstance(unet.down_blocks[1].attentions[1].attention.to_q, fp8.FP8Linear)
    assert type(unet.conv_in) is nn.Conv2d and type(unet.time_embedding.linear_1) is nn.Linear
    assert fp8.targets(unet) == []  # nothing convertible left
    other = model.sample(ROWS)
    assert torch.isfinite(other).all()
    error = float((other - latents).norm() / latents.norm())
    assert 1e-4 < error < 0.3  # moved by E4M3's rounding, not far
    for a, b in zip(model.decode(other), images, strict=True):
        mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
        assert mse == 0 or 10 * math.log10(255**2 / mse) > 20  # PSNR in dB


def test_precision_fp8_is_bfloat16_with_fp8_gemms():
    cfg = ModelConfig(precision="fp8")
    assert cfg.performance.fp8 and cfg.dtype.unet == "bfloat16" and cfg.performance.tf32
    assert not ModelConfig(precision="bfloat16").performance.fp8
    assert ModelConfig(**cfg.model_dump()).performance.fp8  # a dump validates again
    with pytest.raises(ValueError, match="model.performance.fp8: false contradicts"):
        ModelConfig(precision="fp8", performance={"fp8": False})


def test_speed_settings_leave_the_fingerprint_fp8_changes_it():
    from k3batch import resume
    from k3batch.config import load_config

    def identity(**performance):
        cfg = load_config(
            data={
                "input": {"uri": "in.parquet"},
                "output": {"uri": "out"},
                "model": {"path": "somewhere", "performance": performance},
            }
        )
        return resume.fingerprint(resume.job_identity(cfg))

    base = identity()
    assert (
        identity(
            movq_attention="chunked",
            cudnn_benchmark=True,
            compile={"scope": "whole", "conv_1x1_as_mm": True, "artifacts": False},
        )
        == base
    )
    assert identity(fp8=True) != base


# ------------------------------------------------------------ MoVQ attention
@pytest.mark.parametrize("kind", ["chunked", "split_heads"])
def test_movq_attention_kinds_give_the_sdpa_images(tiny_dir, plain, kind):
    _, latents, images = plain
    model = load_tiny(tiny_dir, performance={"movq_attention": kind})
    processors = {type(m.processor).__name__ for m in model.movq.modules() if hasattr(m, "heads")}
    assert processors == {"MovqAttention"}
    assert_same_images(model.decode(latents), images)


def test_chunked_and_split_heads_attention_compute_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 300, 64, generator=g) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v
    # Chunks that do not divide the tokens; value heads of 16 sharing the 64-wide scores.
    torch.testing.assert_close(movq_attention.chunked(q, k, v, chunk=128), expected)
    torch.testing.assert_close(movq_attention.split_heads(q, k, v, width=16), expected)
    with pytest.raises(ValueError, match="movq_attention must be one of sdpa, chunked"):
        movq_attention.MovqAttention("flash")


def test_cudnn_benchmark_follows_the_setting(tiny_dir):
    try:
        load_tiny(tiny_dir, performance={"cudnn_benchmark": True})
        assert torch.backends.cudnn.benchmark
        load_tiny(tiny_dir)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False


def test_a_regional_compile_stage_warms_up_and_writes_no_artifacts_without_kernels(
    tiny_dir, tmp_path
):
    """The generation stage compiles at start; with the `eager` backend there is nothing
    for torch.compiler to save, and no file is written, even when something else in the
    process was compiled to kernels before (its artifacts are not this model's)."""
    from k3batch.stages.generate import GenerateStage

    torch._dynamo.reset()
    torch.compile(lambda x: x * 3 + 1, backend="inductor")(torch.arange(4.0))
    cache = str(tmp_path / "stage-cache")
    cfg = ModelConfig(
        path=tiny_dir,
        dtype=FP32,
        device="cpu",
        performance={"compile": {"unet": True, "backend": "eager", "cache_dir": cache}},
    )
    stage = GenerateStage(cfg, warmup={"width": 64, "height": 64, "batch_size": 1})
    assert stage.warmup_seconds is not None
    (unet,) = stage.pipe.compiled
    assert unet.counts()["not_run"] == 0 and unet.counts()["eager"] == 0
    assert not os.path.isdir(os.path.join(cache, "artifacts"))
