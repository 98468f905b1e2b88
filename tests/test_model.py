import numpy as np
import pytest
import torch

from k3batch.model.kandinsky3.pipeline import Kandinsky3, Request
from k3batch.model.schedule import DiffusionSchedule, base_timesteps, cosine_betas

from .conftest import FP32, LATENT_ATOL, assert_same_images


def req(prompt="a red cat at sunset", seed=1, size=64, steps=4, w=3.0, negative=None, width=None):
    return Request(prompt, negative, seed, width or size, size, steps, w)


def test_reference_timesteps():
    assert base_timesteps(50) == list(range(999, 0, -20))
    assert base_timesteps(50)[-1] == 19 and len(base_timesteps(50)) == 50
    assert base_timesteps(4) == [999, 749, 499, 249]
    with pytest.raises(ValueError):
        base_timesteps(0)


def test_cosine_schedule_matches_formula():
    betas = cosine_betas()
    assert betas.shape == (1000,) and float(betas.max()) == pytest.approx(0.999)
    abar = torch.cumprod(1 - betas, 0)
    assert float(abar[0]) == pytest.approx(1 - betas[0].item())
    assert float(abar[-1]) < 1e-4


def test_last_step_adds_no_noise_and_threshold_bounds_x0():
    s = DiffusionSchedule()
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = s.ddim_step(x, 19, 0, eps, torch.randn_like(x), 0.99)
    b = s.ddim_step(x, 19, 0, eps, torch.randn_like(x), 0.99)
    assert torch.equal(a, b)
    c = s.ddim_step(x, 39, 19, eps, torch.randn_like(x), 0.99)
    d = s.ddim_step(x, 39, 19, eps, torch.randn_like(x), 0.99)
    assert not torch.equal(c, d)
    x0 = s.threshold(torch.randn(3, 4, 8, 8) * 5, 0.99)
    assert float(x0.abs().max()) <= 1.0 + 1e-6


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    from .reference_oracle import Oracle

    return Oracle(tiny_dir)


@pytest.mark.parametrize("negative", [None, "blurry, ugly"])
def test_matches_reference_sampler_for_one_prompt(tiny_model, oracle, negative):
    prompt, seed = "a blue robot in the rain, oil painting", 11
    ref_latent, ref_image = oracle(prompt, seed, w=3.0, steps=4, size=64, negative=negative)
    r = req(prompt, seed, negative=negative)
    latent = tiny_model.sample([r])
    torch.testing.assert_close(latent, ref_latent, atol=1e-4, rtol=1e-4)
    image = tiny_model.generate([r])[0]
    assert image.shape == ref_image.shape == (64, 64, 3)
    assert np.abs(image.astype(int) - ref_image.astype(int)).max() <= 1


def test_rows_of_one_batch_each_match_the_reference_sampler(tiny_model, oracle):
    """Rows that differ in prompt, negative prompt, seed and guidance (none of them 3.0, the
    default; steps 5, not 4) in one batch on a non-square canvas: each row is the reference's
    image for that row alone."""
    rows = [
        Request("a red cat at sunset", None, 21, 96, 64, 5, 1.5),
        Request("a blue robot in the rain, oil painting", "blurry, ugly", 22, 96, 64, 5, 6.0),
        Request("owl", "a dark forest at night, very detailed", 23, 96, 64, 5, 0.0),
    ]
    latents = tiny_model.sample(rows)
    for r, latent in zip(rows, latents, strict=True):
        want, _ = oracle(
            r.prompt, r.seed, w=r.guidance_scale, steps=5, size=64, width=96,
            negative=r.negative_prompt,
        )  # fmt: skip
        torch.testing.assert_close(latent[None], want, atol=1e-4, rtol=1e-4)


def tiny_model_cond(model, requests):
    from k3batch.model.kandinsky3 import text

    tokens = text.tokenize(
        model.tokenizer, [r.prompt for r in requests], [r.negative_prompt for r in requests]
    )
    return text.encode(
        tokens,
        model.text_encoder,
        model.projection,
        model.uncond,
        model.null_embedding,
        torch.float32,
    )


def test_image_depends_only_on_its_row_not_on_batch(tiny_model):
    rows = [
        req("a red cat at sunset", 1),
        req(
            "a blue robot in the rain, oil painting, with a much longer prompt than the others",
            2,
            negative="blurry",
        ),
        req("owl", 3, w=0.0),
        req("a dragon over a castle", 4, negative="ugly dragon cat", w=5.0),
        req("a teapot", 2**64 - 1),
    ]
    together = tiny_model.sample(rows)
    alone = torch.cat([tiny_model.sample([r]) for r in rows])
    reordered = tiny_model.sample(rows[::-1]).flip(0)
    torch.testing.assert_close(together, alone, atol=LATENT_ATOL, rtol=0)
    torch.testing.assert_close(together, reordered, atol=LATENT_ATOL, rtol=0)
    assert_same_images(tiny_model.decode(together), tiny_model.decode(alone))


def test_seed_prompt_and_guidance_each_change_the_image(tiny_model):
    base = tiny_model.generate([req(seed=5)])[0]
    assert np.array_equal(base, tiny_model.generate([req(seed=5)])[0])
    for other in (
        req(seed=6),
        req(prompt="a green owl", seed=5),
        req(seed=5, w=7.0),
        req(seed=5, negative="dark"),
    ):
        assert not np.array_equal(base, tiny_model.generate([other])[0])


def test_output_size_follows_width_and_height(tiny_model):
    image = tiny_model.generate([req(size=64, width=128)])[0]
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8


def test_one_call_refuses_mixed_sizes(tiny_model):
    with pytest.raises(ValueError) as e:
        tiny_model.generate([req(size=64), req(size=128)])
    assert str(e.value) == (
        "one generate() call takes rows of one size, step count and kind (and strength and "
        "scheduler)"
    )


def test_checkpoint_without_null_embedding_uses_zeros_and_says_so(tiny_dir_no_null):
    model = Kandinsky3.from_pretrained(tiny_dir_no_null, dtype=FP32, device="cpu")
    assert model.uncond == "zeros" and model.null_embedding is None
    rows = [req("a cat", 1), req("a very long prompt about a castle in the clouds at night", 2)]
    together = model.sample(rows)
    alone = torch.cat([model.sample([r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=LATENT_ATOL, rtol=0)


def test_zeros_branch_equals_diffusers_zero_embeddings(tiny_dir_no_null):
    """The 'zeros' uncond branch gives what diffusers' all-zero embeddings + mask give."""
    from k3batch.model.kandinsky3 import text

    model = Kandinsky3.from_pretrained(tiny_dir_no_null, dtype=FP32, device="cpu")
    r = req("a lighthouse at sunset", 3)
    cond = tiny_model_cond(model, [r])
    n = int(cond.pool_lengths[0])
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500.0])
    model.pooling.lengths = cond.pool_lengths
    ours = model.unet(x, t, cond.uncond_context, cond.uncond_mask).sample
    # diffusers: zeros through the projection at every position of a context cut to n, mask 0
    zeros_ctx = model.projection(torch.zeros(1, n, model.projection.projection_linear.in_features))
    model.pooling.lengths = torch.tensor([float(n)])
    theirs = model.unet(x, t, zeros_ctx, torch.zeros(1, n, dtype=torch.long)).sample
    model.pooling.lengths = None
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert model.uncond == text.UNCOND_ZEROS


def test_row_length_pooling_equals_stock_pooling_on_each_rows_own_context(tiny_model):
    """Per row, pooling over the 128-position context equals diffusers' mean pooling over
    the reference's context cut to n + 1 (and the plain mean over 128 would not)."""
    rows = [req("owl", 1), req("a blue robot in the rain, oil painting, in a misty morning", 2)]
    cond = tiny_model_cond(tiny_model, rows)
    pooling = tiny_model.pooling
    stock = pooling.pooling  # diffusers' Kandinsky3AttentionPooling
    time_embed = torch.randn(2, 4)
    mask = (1 - cond.context_mask.float()) * -10000.0
    pooling.lengths = cond.pool_lengths
    ours = pooling(time_embed, cond.context * 20, mask.unsqueeze(1))
    pooling.lengths = None
    for i in range(2):
        n = int(cond.pool_lengths[i])
        ref = stock(
            time_embed[i : i + 1],
            cond.context[i : i + 1, :n] * 20,
            mask[i : i + 1, :n].unsqueeze(1),
        )
        torch.testing.assert_close(ours[i : i + 1], ref, atol=1e-5, rtol=1e-5)
        plain = stock(
            time_embed[i : i + 1], cond.context[i : i + 1] * 20, mask[i : i + 1].unsqueeze(1)
        )
        assert (plain - ref).abs().max() > 1e-4


def test_bench_size_is_the_same_family_wider_and_loads_like_the_tiny_one(tmp_path):
    from k3batch.testing.tiny import is_tiny_checkpoint, make_tiny
    from k3batch.testing.tiny_parts import BENCH_MOVQ, BENCH_UNET

    path = make_tiny(str(tmp_path / "bench"), size="bench")
    assert is_tiny_checkpoint(path, size="bench") and not is_tiny_checkpoint(path)
    model = Kandinsky3.from_pretrained(path, dtype=FP32, device="cpu")
    assert tuple(model.unet.config.block_out_channels) == BENCH_UNET["block_out_channels"]
    assert list(model.movq.config.block_out_channels) == BENCH_MOVQ["block_out_channels"]
    (image,) = model.generate([req(size=64, steps=4)])
    assert image.shape == (64, 64, 3) and image.std() > 0
    with pytest.raises(ValueError, match="diffusers layout only"):
        make_tiny(str(tmp_path / "ref"), layout="reference", size="bench")


def test_rows_carrying_pooled_text_are_the_rows_with_prompts_and_need_it_without_t5(
    tiny_model, tiny_dir
):
    """Rows whose T5 outputs come from the text encoder pool (`embed`, then `Request.text`)
    give the images of the same rows with prompts, negatives included, on a model loaded
    without T5; rows without them are refused there with the exact message."""
    import dataclasses

    rows = [req("a cat", 1, negative="blurry"), req("a long prompt about a castle", 2)]
    texts = tiny_model.embed([r.prompt for r in rows], [r.negative_prompt for r in rows])
    pooled = [dataclasses.replace(r, text=t) for r, t in zip(rows, texts, strict=True)]
    bare = Kandinsky3.from_pretrained(tiny_dir, dtype=FP32, device="cpu", text_encoder=False)
    assert_same_images(bare.generate(pooled), tiny_model.generate(rows))
    with pytest.raises(RuntimeError) as e:
        bare.generate(rows)
    assert str(e.value) == (
        "the model was loaded without its text encoder; rows need prompt embeddings "
        "(resources.text_encoder_pool)"
    )
