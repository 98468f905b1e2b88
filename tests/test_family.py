"""The Kandinsky 3.1 family on tiny models: both weight layouts, Flash, inpainting,
image-to-image and the Flash refiner, checked against restatements of the reference."""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from k3batch import images
from k3batch.model import family
from k3batch.model.kandinsky3 import layout, loading
from k3batch.model.kandinsky3 import members as k3_members
from k3batch.model.kandinsky3.convert import convert
from k3batch.model.kandinsky3.pipeline import Request

from .conftest import LATENT_ATOL, assert_same_images, load_tiny
from .reference_oracle import Oracle

PROMPT = "a blue robot in the rain, oil painting"


def req(prompt=PROMPT, seed=1, size=64, steps=4, w=3.0, negative=None, **kw):
    return Request(prompt, negative, seed, size, size, steps, w, **kw)


def sample_image(w=64, h=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ weight layouts
def test_converting_a_reference_checkpoint_gives_the_same_model_as_loading_it(
    tiny_ref_dir, tmp_path
):
    dst = str(tmp_path / "converted")
    assert convert(tiny_ref_dir, dst) == list(k3_members.NAMES)
    assert layout.detect_layout(tiny_ref_dir) == "reference"
    assert layout.detect_layout(dst) == "diffusers"
    members = [family.MEMBERS[n] for n in k3_members.NAMES]
    direct = loading.load(tiny_ref_dir, members, device="cpu")
    converted = loading.load(dst, members, device="cpu")
    g = torch.Generator().manual_seed(0)
    for m in members:
        (a, null_a), (b, null_b) = direct.unets[m.name], converted.unets[m.name]
        x = torch.randn(2, m.in_channels, 8, 8, generator=g)
        text = torch.randn(2, 7, 32, generator=g)  # T5 states: the projection runs in the UNet
        mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 6 + [0]])
        t = torch.tensor([979.0, 229.0])
        with torch.no_grad():
            out_a = a(x, t, text, mask).sample
            out_b = b(x, t, text, mask).sample
        assert out_a.shape == (2, 4, 8, 8)
        assert torch.equal(out_a, out_b), m.name
        assert torch.equal(null_a, null_b)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        dec_a = direct.movq.decode(z, force_not_quantize=True).sample
        assert torch.equal(dec_a, converted.movq.decode(z, force_not_quantize=True).sample)
    ids = converted.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(
            direct.text_encoder(input_ids=ids).last_hidden_state,
            converted.text_encoder(input_ids=ids).last_hidden_state,
        )
    with pytest.raises(FileExistsError):
        convert(tiny_ref_dir, dst)


def test_reference_pickles_are_read_weights_only(tiny_ref_dir, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(tiny_ref_dir, evil)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"unet": Payload(), "null_embedding": None}, evil / "weights" / "kandinsky3.pt")
    with pytest.raises(pickle.UnpicklingError):
        loading.load(str(evil), [family.MEMBERS[family.BASE]], device="cpu")
    assert not marker.exists()


def test_reference_layout_generates_what_the_diffusers_layout_generates(tiny_ref_dir, tiny_model):
    ref_model = load_tiny(tiny_ref_dir)
    r = req(seed=3, negative="blurry")
    torch.testing.assert_close(ref_model.sample([r]), tiny_model.sample([r]), atol=0, rtol=0)


def test_per_component_dtypes(tiny_dir, cpu_bfloat16_attention):
    model = load_tiny(
        tiny_dir,
        "kandinsky3-flash",
        dtype={"unet": "bfloat16", "text_encoder": "float32", "movq": "float32"},
    )
    assert model.unet.dtype == torch.bfloat16
    assert model.projection.projection_linear.weight.dtype == torch.bfloat16
    assert next(model.movq.parameters()).dtype == torch.float32
    assert next(model.text_encoder.parameters()).dtype == torch.float32
    latent = model.sample([req()])
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all()


# ------------------------------------------------------------------ Flash
@pytest.fixture(scope="module")
def flash_model(tiny_dir):
    return load_tiny(tiny_dir, "kandinsky3-flash")


def record_timesteps(unet):
    seen = []
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].tolist()))
    return seen, hook


def test_flash_runs_exactly_four_unet_evaluations_at_its_timesteps(flash_model):
    seen, hook = record_timesteps(flash_model.unet)
    try:
        flash_model.generate([req(steps=50, seed=1), req(steps=50, seed=2, negative="dark")])
    finally:
        hook.remove()
    assert seen == [[979.0] * 2, [729.0] * 2, [479.0] * 2, [229.0] * 2]  # no uncond half


def test_flash_matches_the_reference_loop(flash_model, tiny_dir):
    expected = Oracle(tiny_dir, "unet_flash").flash(PROMPT, seed=11)
    torch.testing.assert_close(flash_model.sample([req(seed=11)]), expected, atol=1e-4, rtol=1e-4)


def test_flash_ignores_negative_prompt_and_guidance_and_is_batch_invariant(flash_model):
    rows = [req(seed=1), req("owl", seed=2), req("a castle at night, watercolor", seed=3)]
    plain = flash_model.sample(rows)
    alone = torch.cat([flash_model.sample([r]) for r in rows])
    torch.testing.assert_close(plain, alone, atol=LATENT_ATOL, rtol=0)
    guided = flash_model.sample([req(seed=1, negative="blurry", w=9.0)])
    assert torch.equal(guided, flash_model.sample([req(seed=1)]))
    assert flash_model.uncond == "none"


# ------------------------------------------------------------------ inpainting
@pytest.fixture(scope="module")
def inpaint_model(tiny_dir):
    return load_tiny(tiny_dir, "kandinsky3-inpaint")


def inpaint_request(image: np.ndarray, repaint: np.ndarray, seed=1, **kw) -> Request:
    h, w = repaint.shape
    width, height = images.diffusion_size(w, h)
    pixels = images.prepare_image(Image.fromarray(image), (width, height))
    keep = images.prepare_mask(repaint, (width, height))
    return Request(PROMPT, None, seed, width, height, 4, 4.0, image=pixels, mask=keep, **kw)


def left_half_mask(h=64, w=64) -> np.ndarray:
    repaint = np.zeros((h, w))
    repaint[:, : w // 2] = 1.0
    return repaint


def test_inpainting_keeps_the_unmasked_conditioning_and_repaints_only_the_mask(inpaint_model):
    image = sample_image()
    r = inpaint_request(image, left_half_mask())
    encoded, unet_inputs = [], []
    hooks = [
        inpaint_model.movq.encoder.register_forward_pre_hook(
            lambda mod, args: encoded.append(args[0].clone())
        ),
        inpaint_model.unet.register_forward_pre_hook(
            lambda mod, args: unet_inputs.append(args[0].clone())
        ),
    ]
    try:
        inpaint_model.sample([r])
    finally:
        for h in hooks:
            h.remove()
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255 * 2 - 1
    masked = encoded[0][0]
    assert torch.equal(masked[:, :, 32:], pixels[:, :, 32:])  # kept half intact
    assert not masked[:, :, :32].any()  # repaint half (mask = 1) blanked
    assert len(unet_inputs) == 4 and unet_inputs[0].shape == (2, 9, 8, 8)
    x = unet_inputs[0]
    keep = x[0, 4]
    assert torch.equal(keep[:, :4], torch.zeros(8, 4)) and torch.equal(
        keep[:, 4:], torch.ones(8, 4)
    )
    torch.testing.assert_close(x[0, 5:], inpaint_model.encode(masked[None])[0], atol=0, rtol=0)
    assert torch.equal(x[0], x[1])  # the same conditioning in the guided and unguided halves


def test_inpainting_matches_the_reference_pipeline(inpaint_model, tiny_dir):
    # 100x70 with a mask of the same size: both resized by the reference's rules to 64x64.
    image = sample_image(100, 70, seed=4)
    repaint = np.zeros((70, 100))
    repaint[10:50, 20:70] = 1
    expected = Oracle(tiny_dir, "unet_inpaint").inpaint(
        PROMPT, 7, Image.fromarray(image), repaint, w=4.0, steps=4
    )
    latent = inpaint_model.sample([inpaint_request(image, repaint, seed=7)])
    torch.testing.assert_close(latent, expected, atol=1e-4, rtol=1e-4)


def test_inpainting_is_batch_invariant(inpaint_model):
    rows = [
        inpaint_request(sample_image(seed=1), left_half_mask(), seed=1),
        inpaint_request(sample_image(seed=2), left_half_mask().T.copy(), seed=2),
    ]
    together = inpaint_model.sample(rows)
    alone = torch.cat([inpaint_model.sample([r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=LATENT_ATOL, rtol=0)


# ------------------------------------------------------------------ image-to-image
def test_image_to_image_with_strength_near_zero_returns_the_input(tiny_model):
    image = sample_image(seed=5)
    r = req(steps=10, image=image, strength=0.05)  # int(10 * 0.05) = 0 steps
    latent = tiny_model.sample([r])
    source = tiny_model.encode(tiny_model._pixels([r]))
    assert torch.equal(latent, source)
    # The image is the input through the MoVQ round trip (the tiny MoVQ is random, so that
    # round trip is not the identity it is for the real one).
    assert np.array_equal(tiny_model.generate([r])[0], tiny_model.decode(source)[0])
    # One step at t=99 stays closer to the input than full strength does.
    one = tiny_model.sample([req(steps=10, image=image, strength=0.1)])
    full = tiny_model.sample([req(steps=10, image=image, strength=1.0)])
    assert (one - source).abs().mean() < (full - source).abs().mean()


def test_image_to_image_at_full_strength_is_text_to_image(tiny_model):
    # At t=999 the input keeps a weight of sqrt(alphas_cumprod[999]) ~ 5e-5.
    text = tiny_model.sample([req(seed=9)])
    image = tiny_model.sample([req(seed=9, image=sample_image(), strength=1.0)])
    torch.testing.assert_close(image, text, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def oracle(tiny_dir):
    return Oracle(tiny_dir)


def test_image_to_image_rows_match_the_reference_sampler_from_the_input(tiny_model, oracle):
    """The documented rule (models-and-numerics.md: the last int(steps * strength) reference
    timesteps, the input's latent noised to the first) restated in the oracle: 10 steps at
    strength 0.35 run 3 (t = 299, 199, 99); rows with other guidance, seeds and a negative
    prompt in one batch, on a non-square image."""
    images = [sample_image(128, 64, seed=s) for s in (31, 32)]
    rows = [
        Request(PROMPT, None, 31, 128, 64, 10, 2.0, image=images[0], strength=0.35),
        Request("a lighthouse at dawn", "fog", 32, 128, 64, 10, 6.5, image=images[1],
                strength=0.35),
    ]  # fmt: skip
    latents = tiny_model.sample(rows)
    for r, latent in zip(rows, latents, strict=True):
        want = oracle.image_to_image(
            r.prompt, r.seed, r.image, 0.35, w=r.guidance_scale, steps=10,
            negative=r.negative_prompt,
        )  # fmt: skip
        torch.testing.assert_close(latent[None], want, atol=1e-4, rtol=1e-4)


def test_image_to_image_rows_are_batch_invariant(tiny_model):
    rows = [req(seed=s, image=sample_image(seed=s), strength=0.5) for s in (1, 2)]
    together = tiny_model.sample(rows)
    alone = torch.cat([tiny_model.sample([r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=LATENT_ATOL, rtol=0)


# ------------------------------------------------------------------ Flash refiner
@pytest.fixture(scope="module")
def refine_model(tiny_dir):
    return load_tiny(tiny_dir, refine=True)


def test_refiner_is_one_flash_step_at_229_on_the_base_latent(refine_model, tiny_model, tiny_dir):
    r = req(seed=5)
    seen, hook = record_timesteps(refine_model.refiner.unet)
    try:
        refined = refine_model.sample([r])
    finally:
        hook.remove()
    assert seen == [[229.0]]
    base = tiny_model.sample([r])
    # The reference's gan step with the Flash UNet, noise = the row's next draw after the
    # base loop (initial latent + one per step).
    flash = Oracle(tiny_dir, "unet_flash")
    g = torch.Generator().manual_seed(5)
    for _ in range(1 + r.num_inference_steps):
        torch.randn(base.shape, generator=g)
    with torch.no_grad():
        expected = flash.flash_step(base, 229, g, flash.text(PROMPT))
    torch.testing.assert_close(refined, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(refined, base, atol=1e-3)


def test_refined_rows_are_batch_invariant(refine_model):
    rows = [req(seed=1), req("a lighthouse", seed=3)]
    together = refine_model.sample(rows)
    alone = torch.cat([refine_model.sample([r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=LATENT_ATOL, rtol=0)
    assert_same_images(refine_model.decode(together), refine_model.decode(alone))
