"""The GPU path's options keep images equal to the plain path (tiny model, CPU).

On CPU these check equality and wiring; the speed they buy is measured on GPUs by
benchmarks/gpu_bench.py.
"""

import numpy as np
import pytest
import torch

from k3batch.config import ModelConfig
from k3batch.model.kandinsky3 import text
from k3batch.model.kandinsky3.pipeline import Kandinsky3, Request
from k3batch.model.kandinsky3.prompt_encoder import PromptEncoder

from .conftest import FP32, LATENT_ATOL, assert_same_images, load_tiny


def req(prompt="a red cat at sunset", seed=1, negative=None, size=64, steps=3, w=3.0):
    return Request(prompt, negative, seed, size, size, steps, w)


ROWS = [
    req("a red cat at sunset", 1),
    req("a blue robot in the rain, oil painting, in a misty morning", 2, negative="blurry"),
    req("owl", 3, negative="a dark forest under the stars, pencil sketch"),
]


@pytest.fixture(scope="module")
def plain(tiny_dir):
    model = load_tiny(tiny_dir)
    latents = model.sample(ROWS)
    return model, latents, model.decode(latents)


def attention_processors(module):
    from diffusers.models.attention_processor import Attention

    return [type(m.processor).__name__ for m in module.modules() if isinstance(m, Attention)]


def test_eager_and_sdpa_attention_give_the_same_images(tiny_dir, plain):
    model, latents, images = plain
    eager = load_tiny(tiny_dir, performance={"attention": "eager"})
    # Every attention layer switched: UNet self/cross attention and pooling, MoVQ.
    unet_procs, movq_procs = attention_processors(eager.unet), attention_processors(eager.movq)
    assert len(unet_procs) == 13 and set(unet_procs) == {"AttnProcessor"}
    assert len(movq_procs) == 5 and set(movq_procs) == {"AttnProcessor"}
    assert eager.text_encoder.config._attn_implementation == "eager"
    assert set(attention_processors(model.unet) + attention_processors(model.movq)) == {
        "AttnProcessor2_0"
    }
    assert model.text_encoder.config._attn_implementation == "sdpa"
    other = eager.sample(ROWS)
    torch.testing.assert_close(other, latents, atol=LATENT_ATOL, rtol=0)
    assert_same_images(eager.decode(other), images)


def test_channels_last_gives_the_same_images(tiny_dir, plain):
    _, latents, images = plain
    model = load_tiny(tiny_dir, performance={"channels_last": True})
    cl = torch.channels_last
    assert model.unet.conv_in.weight.is_contiguous(memory_format=cl)
    assert not model.unet.conv_in.weight.is_contiguous()
    assert model.movq.decoder.conv_in.weight.is_contiguous(memory_format=cl)
    other = model.sample(ROWS)
    torch.testing.assert_close(other, latents, atol=LATENT_ATOL, rtol=0)
    assert_same_images(model.decode(other), images)


@pytest.mark.slow
def test_compiled_unet_and_decoder_give_the_same_images(tiny_dir, plain):
    """torch.compile through the config path. Inductor on this 2-core CPU takes 1-2 minutes
    per shape (checked by hand: UNet within 6e-6, decoder within 2e-5 of eager), so the test
    compiles with the `eager` backend: dynamo captures the whole UNet and decoder
    (fullgraph=True: a graph break fails) and runs the captured graphs."""
    from torch._dynamo.utils import counters

    _, latents, images = plain
    torch._dynamo.reset()
    counters.clear()
    model = load_tiny(
        tiny_dir,
        performance={
            "compile": {
                "unet": True,
                "movq": True,
                "backend": "eager",
                "fullgraph": True,
                "scope": "whole",
            }
        },
    )
    assert model.unet._compiled_call_impl is not None
    assert model.movq.decoder._compiled_call_impl is not None
    other = model.sample(ROWS)
    torch.testing.assert_close(other, latents, atol=LATENT_ATOL, rtol=0)
    assert_same_images(model.decode(other), images)
    assert counters["stats"]["unique_graphs"] >= 2  # the UNet's graph and the decoder's
    # Other prompts, same shapes: the per-row pooling lengths are inputs, not baked in.
    rows = [req("a castle", 7), req("a green owl in winter, watercolor, low poly", 8), req()]
    torch.testing.assert_close(model.sample(rows), plain[0].sample(rows), atol=LATENT_ATOL, rtol=0)


def test_guided_sampling_runs_cond_and_uncond_in_one_unet_forward(tiny_model):
    calls = []
    hook = tiny_model.unet.register_forward_pre_hook(
        lambda module, args: calls.append(args[0].shape[0])
    )
    try:
        tiny_model.sample(ROWS)
    finally:
        hook.remove()
    # 3 steps, each one forward of the 3 cond rows and their 3 uncond rows together.
    assert calls == [6, 6, 6]


def test_decode_in_chunks_equals_one_at_a_time(tiny_model, plain):
    _, latents, images = plain
    tiny_model.decode_batch_size = 2
    try:
        assert_same_images(tiny_model.decode(latents), images)
    finally:
        tiny_model.decode_batch_size = 1


def test_decode_halves_its_chunk_on_out_of_memory(tiny_dir, plain, monkeypatch):
    _, latents, images = plain
    model = load_tiny(tiny_dir, decode_batch_size=8)
    real = model.movq.decode
    sizes = []

    def decode(z, **kwargs):
        sizes.append(z.shape[0])
        if z.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z, **kwargs)

    monkeypatch.setattr(model.movq, "decode", decode)
    five = torch.cat([latents, latents[:2]])
    out = model.decode(five)
    # Chunks keep one shape (5 rows padded to 8), halved on each failure, then kept.
    assert sizes == [8, 4, 2, 1, 1, 1, 1, 1]
    assert model.decode_batch_size == 1
    assert_same_images(out, [*images, *images[:2]])
    # One latent that does not fit is the row's error, not a loop.
    sizes.clear()
    monkeypatch.setattr(model.movq, "decode", lambda z, **kwargs: decode(torch.cat([z, z])))
    with pytest.raises(torch.OutOfMemoryError):
        model.decode(latents[:1])
    assert sizes == [2]


def test_bfloat16_components_stay_close_and_the_sampler_stays_float32(
    tiny_dir, plain, cpu_bfloat16_attention
):
    _, latents, images = plain
    bf16 = {"unet": "bfloat16", "text_encoder": "bfloat16", "movq": "bfloat16"}
    model = load_tiny(tiny_dir, dtype=bf16)
    steps = []
    real_step = model.schedule.ddim_step
    model.schedule.ddim_step = lambda x, t, p, eps, noise, q: (
        steps.append((x.dtype, eps.dtype)) or real_step(x, t, p, eps, noise, q)
    )
    other = model.sample(ROWS)
    assert other.dtype == torch.float32 and set(steps) == {(torch.float32, torch.float32)}
    # bfloat16 keeps 8 bits of mantissa. On this random tiny UNet the latent moves by up to
    # 0.08 (its std is 0.4) and an image by ~1 grey level on average: close, not equal.
    assert (other - latents).abs().max() < 0.25
    decoded = model.decode(other)
    diff = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(decoded, images, strict=True)]
    assert max(float(d.mean()) for d in diff) < 4


# ------------------------------------------------------------- text encoder pool
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prompt_embeddings_round_trip_as_bytes(dtype):
    t = torch.randn(5, 8).to(getattr(torch, dtype))
    back = text.from_bytes(text.to_bytes(t), 5, t.dtype)
    assert back.dtype == t.dtype and torch.equal(back, t)


@pytest.mark.parametrize("member", ["kandinsky3", "kandinsky3-flash"])
def test_embeddings_from_the_prompt_encoder_give_the_same_images(tiny_dir, member):
    """The pool path: T5 in one process, bytes across, a model without T5 in another."""
    encoder = PromptEncoder.from_pretrained(tiny_dir, member=member, dtype=FP32, device="cpu")
    with_t5 = load_tiny(tiny_dir, member)
    without = load_tiny(tiny_dir, member, text_encoder=False)
    assert without.text_encoder is None and without.tokenizer is None
    # Encoded in another batch than they are generated in.
    embeddings = encoder.embed(
        [r.prompt for r in ROWS[::-1]], [r.negative_prompt for r in ROWS[::-1]]
    )
    embeddings = embeddings[::-1]
    if member == "kandinsky3-flash":
        assert all(e.negative is None for e in embeddings)  # no guidance, never encoded
    else:
        assert [e.negative is not None for e in embeddings] == [False, True, True]
    rows = []
    for r, e in zip(ROWS, embeddings, strict=True):
        sent = text.PromptEmbedding(
            text.from_bytes(text.to_bytes(e.states), e.length, e.states.dtype),
            None
            if e.negative is None
            else text.from_bytes(text.to_bytes(e.negative), e.length, e.states.dtype),
        )
        rows.append(Request(**{**r.__dict__, "text": sent}))
    torch.testing.assert_close(without.sample(rows), with_t5.sample(ROWS), atol=LATENT_ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="without its text encoder"):
        without.sample(ROWS)


def test_generate_stage_passes_performance_settings_to_the_model(tiny_dir):
    from k3batch.stages.generate import GenerateStage

    cfg = ModelConfig(
        path=tiny_dir,
        dtype=FP32,
        device="cpu",
        performance={"attention": "eager", "channels_last": True},
    )
    stage = GenerateStage(cfg, text_encoder_pool=True)
    assert set(attention_processors(stage.pipe.movq)) == {"AttnProcessor"}
    assert stage.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert stage.pipe.text_encoder is None
    assert isinstance(stage.pipe, Kandinsky3)


def test_sampling_halves_its_batch_on_out_of_memory(tiny_dir, plain):
    _, _, images = plain
    model = load_tiny(tiny_dir)
    real = model.sample
    sizes = []

    def sample(requests):
        sizes.append(len(requests))
        if len(requests) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(requests)

    model.sample = sample
    out = model.generate(ROWS)
    assert sizes == [3, 1, 1, 1]  # 3 rows, halved to 1, then kept
    assert model.max_batch == 1
    assert_same_images(out, images)
    sizes.clear()
    model.generate(ROWS[:2])
    assert sizes == [1, 1]
    # One row that does not fit is the row's error, not a loop.
    model.sample = lambda requests: (_ for _ in ()).throw(torch.OutOfMemoryError("oom"))
    with pytest.raises(torch.OutOfMemoryError):
        model.generate(ROWS[:1])


def test_row_noise_is_each_generators_own_sequence_whatever_the_window():
    from k3batch.model import noise

    seeds = [5, 6, 7]
    stream = noise.RowNoise([torch.Generator().manual_seed(s) for s in seeds], (4, 8, 8), "cpu")
    draws = [stream() for _ in range(2 * noise.WINDOW + 3)]  # across three windows
    for row, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        for k, drawn in enumerate(draws):
            # One draw per step per row, as the per-step loop drew it before.
            assert torch.equal(drawn[row], torch.randn((4, 8, 8), generator=g)), (row, k)


def test_row_noise_lands_on_the_streams_device():
    """Each window is moved to the device the stream was made for, in the shape asked for
    (torch's `meta` device stands in for a GPU: a draw left on the CPU would show)."""
    from k3batch.model import noise

    stream = noise.RowNoise([torch.Generator().manual_seed(s) for s in (1, 2)], (4, 8, 8), "meta")
    draw = stream()
    assert draw.device == torch.device("meta") and draw.shape == (2, 4, 8, 8)


def test_decode_pads_its_chunks_to_one_shape(tiny_dir, plain):
    _, latents, images = plain
    model = load_tiny(tiny_dir, decode_batch_size=2)
    real = model.movq.decode
    shapes = []
    model.movq.decode = lambda z, **kw: shapes.append(z.shape[0]) or real(z, **kw)
    out = model.decode(latents)  # 3 latents: a chunk of 2, then 1 padded to 2
    assert shapes == [2, 2]
    assert_same_images(out, images)


@pytest.mark.slow
def test_a_compiled_generation_stage_warms_up_at_start_on_the_jobs_shape(tiny_dir):
    from torch._dynamo.utils import counters

    from k3batch.stages.generate import GenerateStage

    torch._dynamo.reset()
    counters.clear()
    compile = {"unet": True, "movq": True, "backend": "eager", "fullgraph": True}
    model = {
        "name": "kandinsky3",
        "path": tiny_dir,
        "dtype": FP32,
        "device": "cpu",
        "performance": {"compile": compile},
    }
    stage = GenerateStage(ModelConfig(**model), warmup={"width": 64, "height": 64, "batch_size": 2})
    # Both compiled modules ran (were captured) before the first real batch.
    assert stage.warmup_seconds is not None and counters["stats"]["unique_graphs"] >= 2
    off = GenerateStage(
        ModelConfig(**{**model, "performance": {"compile": {**compile, "warmup": False}}}),
        warmup={"width": 64, "height": 64, "batch_size": 2},
    )
    assert off.warmup_seconds is None


@pytest.mark.slow
def test_compile_cache_dir_holds_the_compiled_kernels(tmp_path, monkeypatch):
    from k3batch.model import performance

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    torch._dynamo.reset()
    module = _Mlp()  # code of torch's own modules is skipped by dynamo; user code is compiled
    performance.compile_module(module, {"cache_dir": str(tmp_path / "cache")})
    module(torch.randn(2, 8))
    # Inductor wrote its generated code there: a second actor pointed at it reuses it.
    assert list((tmp_path / "cache").rglob("*.py"))


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x)) * 2 + 1
