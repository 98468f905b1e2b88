"""Kandinsky 2.2 members (k3batch.model.kandinsky22.pipeline) on tiny random components.

The oracle is diffusers' own pipelines (KandinskyV22CombinedPipeline and friends) loaded
independently from the same tiny folders: for one row, same seed, k3batch's image must equal
theirs. Sizes are kept minimal (64x64, 2 prior and 3 decoder steps). Every setting that
could be read in place of another has its own value: prior steps 2 and guidance 2.5, decoder
steps 3 and guidance 5.0, image-to-image strength 0.6; mix weights do not sum to 1. The
ControlNet hint is built in the test as diffusers' documentation of
`KandinskyV22ControlnetPipeline` builds it (`make_hint`), not with k3batch's code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from k3batch.model import family
from k3batch.model.request import Request
from tests.conftest import assert_same_images

SIZE = 64
STEPS = dict(num_inference_steps=3, prior_num_inference_steps=2)
GUIDANCE = dict(guidance_scale=5.0, prior_guidance_scale=2.5)
PROMPT = "a red fox in the rain, oil painting"
NEGATIVE = "a blue castle"


def _load(root, member, **kwargs):
    from k3batch.model.kandinsky22.pipeline import Kandinsky22
    from k3batch.testing.tiny_k22 import DECODER_FOLDERS

    kwargs.setdefault("device", "cpu")
    return Kandinsky22.from_pretrained(
        f"{root}/{DECODER_FOLDERS[member]}", member=member, prior_path=f"{root}/prior", **kwargs
    )


@pytest.fixture(scope="module")
def models(tiny_k22):
    return {
        family.K22: _load(tiny_k22, family.K22),
        family.K22_INPAINT: _load(tiny_k22, family.K22_INPAINT),
        family.K22_DEPTH: _load(tiny_k22, family.K22_DEPTH, depth_estimator=f"{tiny_k22}/depth"),
    }


@pytest.fixture(scope="module")
def oracle(tiny_k22):
    """diffusers' prior and decoder pipelines, loaded on their own from the tiny folders."""
    from diffusers import (
        KandinskyV22ControlnetPipeline,
        KandinskyV22InpaintPipeline,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
    )

    pipes = {
        "prior": KandinskyV22PriorPipeline.from_pretrained(f"{tiny_k22}/prior"),
        "decoder": KandinskyV22Pipeline.from_pretrained(f"{tiny_k22}/decoder"),
        "inpaint": KandinskyV22InpaintPipeline.from_pretrained(f"{tiny_k22}/decoder-inpaint"),
        "controlnet": KandinskyV22ControlnetPipeline.from_pretrained(
            f"{tiny_k22}/controlnet-depth"
        ),
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def _combined(cls, oracle, decoder):
    prior, dec = oracle["prior"], oracle[decoder]
    return cls(
        unet=dec.unet,
        scheduler=dec.scheduler,
        movq=dec.movq,
        prior_prior=prior.prior,
        prior_image_encoder=prior.image_encoder,
        prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer,
        prior_scheduler=prior.scheduler,
        prior_image_processor=prior.image_processor,
    )


def _uint8(images) -> np.ndarray:
    # output_type="np" then numpy_to_pil's rounding: what a diffusers user saves.
    return (images[0] * 255).round().astype(np.uint8)


def _row(seed=3, negative=NEGATIVE, **fields) -> Request:
    fields = {**STEPS, **GUIDANCE, **fields}
    return Request(PROMPT, negative, seed, SIZE, SIZE, **fields)


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.kron(smooth, np.ones((SIZE // 8, SIZE // 8, 1), np.uint8))


def _pil(a):
    from PIL import Image

    return Image.fromarray(a)


def _g(seed=3):
    return torch.Generator().manual_seed(seed)


DIFFUSERS_ARGS = dict(**STEPS, **GUIDANCE, height=SIZE, width=SIZE, output_type="np")
PRIOR_ARGS = dict(num_inference_steps=2, guidance_scale=2.5)
DECODER_ARGS = dict(num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE)


def make_hint(depth) -> torch.Tensor:
    """diffusers' documented `make_hint` (KandinskyV22ControlnetPipeline's example) from the
    depth-estimation pipeline's `depth` image onwards: one channel repeated on three, /255,
    channels first; batched with a leading axis as the example's `unsqueeze(0)`."""
    depth = np.array(depth)
    if depth.ndim == 2:
        depth = np.concatenate([depth[:, :, None]] * 3, axis=2)
    detected_map = torch.from_numpy(depth).float() / 255.0
    return detected_map.permute(2, 0, 1).unsqueeze(0)


def _controlnet_image(oracle, hint, seed=3, negative=NEGATIVE) -> np.ndarray:
    g = _g(seed)  # one generator through the prior and the decoder, as the combined pipelines
    embeds, negatives = oracle["prior"](
        PROMPT, negative_prompt=negative, generator=g, return_dict=False, **PRIOR_ARGS
    )
    return _uint8(
        oracle["controlnet"](
            image_embeds=embeds,
            negative_image_embeds=negatives,
            hint=hint,
            generator=g,
            output_type="np",
            **DECODER_ARGS,
        ).images
    )


# ---------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_text_to_image_equals_diffusers_combined(models, oracle, negative):
    from diffusers import KandinskyV22CombinedPipeline

    pipe = _combined(KandinskyV22CombinedPipeline, oracle, "decoder")
    want = _uint8(pipe(PROMPT, negative_prompt=negative, generator=_g(), **DIFFUSERS_ARGS).images)
    got = models[family.K22].generate([_row(negative=negative)])
    assert_same_images(got, [want], max_flips=0)
    assert want.std() > 5  # a picture, not a flat field


def test_guidance_off_at_one_equals_diffusers_combined(models, oracle):
    """Guidance 1.0 (Ikomia's decoder default; the prior at 1.0 too): one branch, as diffusers
    runs it, the negative prompt still in the prior's batch (docs/kandinsky22.md)."""
    from diffusers import KandinskyV22CombinedPipeline

    pipe = _combined(KandinskyV22CombinedPipeline, oracle, "decoder")
    off = {**DIFFUSERS_ARGS, "guidance_scale": 1.0, "prior_guidance_scale": 1.0}
    want = _uint8(pipe(PROMPT, negative_prompt=NEGATIVE, generator=_g(), **off).images)
    got = models[family.K22].generate([_row(guidance_scale=1.0, prior_guidance_scale=1.0)])
    assert_same_images(got, [want], max_flips=0)
    guided = models[family.K22].generate([_row()])
    assert np.abs(guided[0].astype(int) - got[0]).mean() > 1


def test_image_to_image_equals_diffusers_combined(models, oracle):
    from diffusers import KandinskyV22Img2ImgCombinedPipeline

    pipe = _combined(KandinskyV22Img2ImgCombinedPipeline, oracle, "decoder")
    image = _image(1)
    want = _uint8(
        pipe(
            PROMPT,
            image=_pil(image),
            negative_prompt=NEGATIVE,
            strength=0.6,
            generator=_g(),
            **DIFFUSERS_ARGS,
        ).images
    )
    got = models[family.K22].generate([_row(image=image, strength=0.6)])
    assert_same_images(got, [want], max_flips=0)


def test_inpainting_equals_diffusers_combined(models, oracle):
    from diffusers import KandinskyV22InpaintCombinedPipeline

    pipe = _combined(KandinskyV22InpaintCombinedPipeline, oracle, "inpaint")
    image = _image(2)
    keep = np.ones((SIZE, SIZE), np.float32)
    keep[16:48, 8:40] = 0
    want = _uint8(
        pipe(
            PROMPT,
            image=_pil(image),
            mask_image=1 - keep,  # diffusers: 1 = repaint
            negative_prompt=NEGATIVE,
            generator=_g(),
            **DIFFUSERS_ARGS,
        ).images
    )
    got = models[family.K22_INPAINT].generate([_row(image=image, mask=keep)])
    assert_same_images(got, [want], max_flips=0)


def test_controlnet_with_hint_equals_diffusers(models, oracle):
    hint = _image(4)  # three different channels: a channel-order mix-up shows
    want = _controlnet_image(oracle, make_hint(hint))
    got = models[family.K22_DEPTH].generate([_row(hint=hint)])
    assert_same_images(got, [want], max_flips=0)


def test_controlnet_with_an_estimated_hint_equals_diffusers_documented_recipe(
    models, oracle, tiny_k22
):
    """A row with an image and no hint: diffusers' documentation estimates the depth with
    transformers' depth-estimation pipeline and makes the hint from its `depth` image."""
    from transformers import pipeline

    depth_estimator = pipeline("depth-estimation", model=f"{tiny_k22}/depth")
    image = _image(8)
    want = _controlnet_image(oracle, make_hint(depth_estimator(_pil(image))["depth"]), seed=5)
    got = models[family.K22_DEPTH].generate([_row(seed=5, image=image)])
    assert_same_images(got, [want], max_flips=0)


@pytest.mark.parametrize("negative", [NEGATIVE, None])
def test_mix_equals_diffusers_interpolate(models, oracle, negative):
    """Weights 0.3 and 0.9 (not normalised by diffusers); a row's negative prompt is the
    prior's negative prompt and gives the negative embedding (docs/kandinsky22.md)."""
    image = _image(5)
    g = _g()
    out = oracle["prior"].interpolate(
        ["a green owl", _pil(image)],
        [0.3, 0.9],
        generator=g,
        negative_prior_prompt=negative,
        negative_prompt="" if negative is None else negative,
        **PRIOR_ARGS,
    )
    want = _uint8(
        oracle["decoder"](
            image_embeds=out.image_embeds,
            negative_image_embeds=out.negative_image_embeds,
            generator=g,
            output_type="np",
            **DECODER_ARGS,
        ).images
    )
    row = _row(negative=negative, mix=[("a green owl", 0.3), (image, 0.9)])
    got = models[family.K22].generate([row])
    assert_same_images(got, [want], max_flips=0)


def test_rows_of_one_batch_each_equal_diffusers(models, oracle):
    """Rows with other prompts, negative prompts and seeds in one call, each against
    diffusers' combined pipeline alone (batch shapes differ: one grey level, conftest)."""
    from diffusers import KandinskyV22CombinedPipeline

    pipe = _combined(KandinskyV22CombinedPipeline, oracle, "decoder")
    rows = [_row(seed=41), _row(seed=42, negative="a green meadow")]
    rows[1].prompt = "a golden teapot on a table"
    got = models[family.K22].generate(rows)
    want = [
        _uint8(
            pipe(
                r.prompt, negative_prompt=r.negative_prompt, generator=_g(r.seed), **DIFFUSERS_ARGS
            ).images
        )
        for r in rows
    ]
    assert_same_images(got, want)


# ---------------------------------------------------------------- batches and seeds
@pytest.mark.parametrize(
    "member, extra",
    [
        (family.K22, {}),  # text-to-image, prompts and negatives in one prior batch
        (family.K22, {"image": _image(6), "strength": 0.7}),
        (family.K22_INPAINT, {"image": _image(7), "mask": np.tril(np.ones((SIZE, SIZE), "f4"))}),
    ],
    ids=["text", "image", "inpaint"],
)
def test_rows_do_not_depend_on_their_batch(models, member, extra):
    model = models[member]
    rows = [_row(seed=s, **extra) for s in (11, 12, 11)]
    rows[1].prompt = "a golden teapot"
    together = model.generate(rows)
    alone = [model.generate([r])[0] for r in rows[:2]]
    assert_same_images(together[:2], alone)
    # Equal rows at two batch positions: equal up to CPU kernels' rounding (conftest).
    assert_same_images([together[2]], [together[0]])
    other_seed = model.generate([_row(seed=13, **extra)])[0]
    assert np.abs(other_seed.astype(int) - together[0].astype(int)).mean() > 1


def test_group_key_separates_negative_none_from_empty(models):
    model = models[family.K22]
    assert model.group_key(_row(negative=None)) != model.group_key(_row(negative=""))
    assert model.group_key(_row()) == model.group_key(_row(seed=9, negative="other"))
    # A row without prior settings runs on the member's.
    m = model.member
    unset = _row(prior_num_inference_steps=None, prior_guidance_scale=None)
    member = _row(
        prior_num_inference_steps=m.prior_num_inference_steps,
        prior_guidance_scale=m.prior_guidance_scale,
    )
    assert model.group_key(unset) == model.group_key(member) != model.group_key(_row())
    # Strength parts image-to-image rows only; it is no part of a text row's key.
    image = _image(1)
    key = model.group_key
    assert key(_row(image=image, strength=0.6)) != key(_row(image=image, strength=0.7))
    assert key(_row(strength=0.6)) == key(_row()) != key(_row(image=image, strength=0.6))


# ---------------------------------------------------------------- depth and bad inputs
def test_estimated_hint_is_transformers_depth_image(models, tiny_k22):
    from transformers import pipeline

    model = models[family.K22_DEPTH]
    image = _image(8)
    hint = model.estimate_hint(image)
    depth = pipeline(
        "depth-estimation", model=model.depth_estimator[0], image_processor=model.depth_estimator[1]
    )(_pil(image))["depth"]
    assert hint.shape == (SIZE, SIZE, 3) and hint.dtype == np.uint8
    np.testing.assert_array_equal(hint[:, :, 0], np.array(depth))
    assert hint.std() > 1
    # A row with an image and no hint runs on the estimated hint.
    got = model.generate([_row(image=image)])
    want = model.generate([_row(hint=hint)])
    assert_same_images(got, want, max_flips=0)


def test_missing_hint_without_estimator_names_hint(tiny_k22, models):
    model = _load(tiny_k22, family.K22_DEPTH)
    message = "hint: ControlNet depth needs a hint, or an image and model.depth_estimator"
    for row in (_row(image=_image(9)), _row()):
        with pytest.raises(ValueError) as e:
            model.generate([row])
        assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        model.estimate_hint(_image(9))
    assert str(e.value) == "hint: no hint given and no model.depth_estimator to estimate it"
    with pytest.raises(ValueError) as e:
        models[family.K22_DEPTH].estimate_hint(np.zeros((4, 4), np.uint8))
    assert str(e.value) == "image: expected an HxWx3 uint8 image, got shape (4, 4)"


@pytest.mark.parametrize(
    "mix, where",
    [
        ([], "mix"),
        ([("a cat", 1.0), ("a dog", float("nan"))], r"mix\[1\]"),
        ([("a cat", 1.0), (np.zeros((8, 8), np.uint8), 1.0)], r"mix\[1\]"),
        ([(np.zeros((8, 8, 3), np.float32), 1.0)], r"mix\[0\]"),
        ([(b"bytes", 1.0)], r"mix\[0\]"),
    ],
)
def test_bad_mix_item_names_mix(models, mix, where):
    with pytest.raises(ValueError, match=f"^{where}"):
        models[family.K22].generate([_row(mix=mix)])


def test_components_on_other_dtypes_still_generate(tiny_k22, models, cpu_bfloat16_attention):
    """Per-component dtypes (contract keys): bfloat16 MoVQ, prior and text encoder around a
    float32 UNet and image encoder, each component under its own name."""
    from k3batch.model.kandinsky22.loading import COMPONENTS

    bf16s = dict(movq="bfloat16", prior="bfloat16", text_encoder="bfloat16")
    model = _load(tiny_k22, family.K22, dtype=bf16s)
    parts = model.components()
    assert set(parts) == set(COMPONENTS) and parts["depth_estimator"] is None
    dtypes = {name: next(m.parameters()).dtype for name, m in parts.items() if m is not None}
    bf16, f32 = torch.bfloat16, torch.float32
    assert dtypes == dict(prior=bf16, movq=bf16, text_encoder=bf16, image_encoder=f32, unet=f32), (
        dtypes
    )
    row = _row(image=_image(10), strength=0.7)
    got = model.generate([row])[0]
    ref = models[family.K22].generate([row])[0]
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 20


# ---------------------------------------------------------------- performance settings
def test_eager_attention_switches_the_added_kv_unet_and_keeps_the_images(tiny_k22, models):
    from diffusers.models.attention_processor import Attention

    def processors(module):
        return {type(m.processor).__name__ for m in module.modules() if isinstance(m, Attention)}

    eager = _load(tiny_k22, family.K22, performance={"attention": "eager"})
    # The decoder UNet's attention carries the image-embedding tokens as added keys/values:
    # a plain processor would drop them.
    assert processors(eager.unet) == {"AttnAddedKVProcessor"}
    assert processors(eager.movq) == {"AttnProcessor"}
    assert processors(models[family.K22].unet) == {"AttnAddedKVProcessor2_0"}
    row = _row(seed=21)
    assert_same_images(eager.generate([row]), models[family.K22].generate([row]))


@pytest.mark.parametrize("member", [family.K22, family.K22_INPAINT, family.K22_DEPTH])
def test_warm_up_runs_a_batch_and_leaves_the_next_images_alone(models, member):
    model = models[member]
    extra = {
        family.K22: {},
        family.K22_INPAINT: {"image": _image(7), "mask": np.tril(np.ones((SIZE, SIZE), "f4"))},
        family.K22_DEPTH: {"hint": _image(8)},
    }[member]
    row = _row(seed=22, **extra)
    before = model.generate([row])
    assert model.warm_up(SIZE, SIZE, 2) > 0
    assert_same_images(model.generate([row]), before, max_flips=0)


def test_input_checks_name_the_field_and_what_is_wrong():
    from k3batch.model.kandinsky22.inputs import check_image, check_mix

    check_image(np.zeros((1, 5, 3), np.uint8), "image")  # one pixel high is an image
    with pytest.raises(
        ValueError, match=r"^image: expected an HxWx3 uint8 image, got shape \(0, 5, 3\)$"
    ):
        check_image(np.zeros((0, 5, 3), np.uint8), "image")
    with pytest.raises(ValueError, match=r"^hint: size 4x2, the row's is 7x5$"):
        check_image(np.zeros((2, 4, 3), np.uint8), "hint", size=(5, 7))
    cases = [
        ([("a dog", 1.0, 2)], r"^mix\[0\]: expected a \(prompt or image, weight\) pair$"),
        ([("a dog", 1.0), ("a cat", "1")], r"^mix\[1\]: weight '1' is not a finite number$"),
        ([(5, 1.0)], r"^mix\[0\]: expected a prompt or an HxWx3 uint8 image, got int$"),
    ]
    for mix, message in cases:
        with pytest.raises(ValueError, match=message):
            check_mix(mix)


def test_depth_hint_is_normalised_off_zero_at_the_images_size_and_blank_when_flat(tiny_k22):
    """`estimate_hint` against transformers' depth-estimation pipeline on depths the tiny
    estimator does not give by itself: its last convolution's bias raised, so the depth's
    minimum is well above 0 (the ReLU head's minimum is 0 otherwise), on an image not of the
    estimator's size; then its weights zeroed, a flat depth: a blank hint (the pipeline's
    min-max would divide by zero). The flat case is at the estimator's own size: resizing a
    flat map bicubically leaves float noise, which min-max stretches to 0..255."""
    from transformers import pipeline

    from k3batch.testing.tiny_k22 import DEPTH_IMAGE_SIZE

    model = _load(tiny_k22, family.K22_DEPTH, depth_estimator=f"{tiny_k22}/depth")
    dpt, processor = model.depth_estimator
    last = dpt.head.head[4]
    assert isinstance(last, torch.nn.Conv2d) and last.out_channels == 1
    image = np.ascontiguousarray(np.concatenate([_image(8), _image(9)], axis=1)[:40])
    with torch.no_grad():
        last.bias += 3.0
        depth = dpt(**processor(images=_pil(image), return_tensors="pt")).predicted_depth
    assert depth.min() > 1.0
    hint = model.estimate_hint(image)
    want = pipeline("depth-estimation", model=dpt, image_processor=processor)(_pil(image))
    assert hint.shape == (40, 2 * SIZE, 3) and hint.dtype == np.uint8
    np.testing.assert_array_equal(hint[:, :, 0], np.array(want["depth"]))
    assert (hint == hint[:, :, :1]).all() and hint.min() == 0 and hint.max() == 255
    with torch.no_grad():
        last.weight.zero_()
    with warnings.catch_warnings():
        # 0 / 0 is NaN, whose uint8 cast is 0 on some CPUs only: no division is the rule.
        warnings.simplefilter("error", RuntimeWarning)
        flat = model.estimate_hint(_image(8)[:DEPTH_IMAGE_SIZE, :DEPTH_IMAGE_SIZE])
    assert flat.shape == (DEPTH_IMAGE_SIZE, DEPTH_IMAGE_SIZE, 3) and not flat.any()


def test_depth_estimator_runs_in_its_own_dtype(tiny_k22, models):
    """The processor's float32 pixels are cast to the estimator's dtype: a bfloat16 one runs
    (its first layer refuses float32) and its hint lands near the float32 one."""
    image = _image(8)
    half = _load(
        tiny_k22,
        family.K22_DEPTH,
        depth_estimator=f"{tiny_k22}/depth",
        dtype={"depth_estimator": "bfloat16"},
    )
    assert next(half.depth_estimator[0].parameters()).dtype == torch.bfloat16
    assert half.components()["depth_estimator"] is half.depth_estimator[0]
    got = half.estimate_hint(image).astype(int)
    want = models[family.K22_DEPTH].estimate_hint(image).astype(int)
    assert got.shape == want.shape and np.abs(got - want).mean() < 8


def test_loading_defaults_a_bad_member_and_no_progress_bars(tiny_k22, capfd):
    """Defaults a caller relies on: the device found ("auto": the CPU here), one latent per
    MoVQ decode (flat memory, images independent of the batch), and other settings passed
    through; a bad member named exactly; no progress bar from diffusers' pipelines on stderr
    while generating."""
    from k3batch.model.kandinsky22.pipeline import Kandinsky22
    from k3batch.testing.tiny_k22 import DECODER_FOLDERS

    model = Kandinsky22.from_pretrained(
        f"{tiny_k22}/{DECODER_FOLDERS[family.K22]}", prior_path=f"{tiny_k22}/prior"
    )
    assert model.member.name == family.K22
    assert model.device == torch.device("cpu") and model.decode_batch_size == 1
    capfd.readouterr()
    model.generate([_row(seed=4)])
    assert "it/s" not in capfd.readouterr().err
    other = _load(
        tiny_k22, family.K22_DEPTH, depth_estimator=f"{tiny_k22}/depth", decode_batch_size=3
    )
    assert other.decode_batch_size == 3 and other.depth_estimator is not None
    with pytest.raises(ValueError) as e:
        Kandinsky22.from_pretrained(f"{tiny_k22}/decoder", member="kandinsky3")
    assert str(e.value) == "kandinsky3 is not a Kandinsky 2.2 member"


def test_channels_last_and_movq_attention_reach_the_unet_and_the_movq(tiny_k22, models):
    """`performance` settings land where they say: the UNet's and the MoVQ's convolutions
    channels-last, the latents decoded channels-last, the MoVQ's attention the chosen kind;
    the image the default model's."""
    from k3batch.model.movq_attention import MovqAttention

    model = _load(
        tiny_k22,
        family.K22,
        performance={"channels_last": True, "movq_attention": "chunked"},
    )
    cl = torch.channels_last
    assert model.unet.conv_in.weight.is_contiguous(memory_format=cl)
    assert model.movq.decoder.conv_in.weight.is_contiguous(memory_format=cl)
    processors = {type(m.processor) for m in model.movq.modules() if hasattr(m, "set_processor")}
    assert processors == {MovqAttention}
    seen = []
    hook = model.movq.post_quant_conv.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=cl))
    )
    try:
        got = model.generate([_row(seed=23)])
    finally:
        hook.remove()
    assert seen == [True]
    assert_same_images(got, models[family.K22].generate([_row(seed=23)]))


def test_controlnet_hint_is_cast_to_a_bfloat16_model(tiny_k22, models, cpu_bfloat16_attention):
    """All components bfloat16 (one dtype: no casting hooks) and the decoder's guidance off
    (diffusers casts the hint only where it doubles it for guidance): the hint tensor is cast
    to the UNet's dtype (float32 would be refused by its hint layers); the image lands near
    the float32 model's."""
    half = _load(tiny_k22, family.K22_DEPTH, dtype="bfloat16")
    assert half.unet.dtype == torch.bfloat16
    row = _row(seed=24, hint=_image(8), guidance_scale=1.0)
    got = half.generate([row])[0].astype(int)
    want = models[family.K22_DEPTH].generate([row])[0].astype(int)
    assert got.shape == want.shape and np.abs(got - want).mean() < 20


def test_rows_a_member_cannot_generate_are_refused_with_the_exact_message(models):
    mask = np.ones((SIZE, SIZE), np.float32)
    cases = [
        (family.K22_INPAINT, _row(mask=mask), "image: inpainting needs an image"),
        (family.K22_INPAINT, _row(image=_image(1)), "mask: inpainting needs a mask"),
        (
            family.K22_INPAINT,
            _row(image=_image(1), mask=mask, mix=[("a cat", 1.0)]),
            f"mix: image mixing runs on {family.K22}, not {family.K22_INPAINT}",
        ),
        (
            family.K22_DEPTH,
            _row(hint=np.zeros((SIZE, SIZE // 2, 3), np.uint8)),
            f"hint: size {SIZE // 2}x{SIZE}, the row's is {SIZE}x{SIZE}",
        ),
        (
            family.K22_DEPTH,
            _row(hint=np.zeros((SIZE, SIZE), np.uint8)),
            f"hint: expected an HxWx3 uint8 image, got shape ({SIZE}, {SIZE})",
        ),
    ]
    for member, row, message in cases:
        with pytest.raises(ValueError) as e:
            models[member].check_request(row)
        assert str(e.value) == message, member
    with pytest.raises(ValueError) as e:
        models[family.K22].generate([_row(), _row(num_inference_steps=4)])
    assert str(e.value) == (
        "one generate() call takes rows of one kind, size, step counts, guidance scales, "
        "strength and negative-prompt presence"
    )


def test_sampling_halves_the_rows_of_a_call_on_out_of_memory_and_keeps_the_size(
    tiny_k22, models, caplog
):
    """A call of more than one row runs out of memory (simulated where the rows are
    sampled): the rows that were tried are halved, logged, and the size kept for later
    calls; a call that fits sets no bound."""
    model = _load(tiny_k22, family.K22)
    rows = [_row(seed=s) for s in (5, 6, 7)]
    model.generate(rows[:2])
    assert model.max_batch is None
    real, sizes = model._generate, []

    def generate(rows):
        sizes.append(len(rows))
        if len(rows) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rows)

    model._generate = generate
    model.max_batch = 4  # a bound larger than the call: the 3 rows tried are what is halved
    with caplog.at_level("WARNING", logger="k3batch.model.performance"):
        out = model.generate(rows)
    assert sizes == [3, 1, 1, 1] and model.max_batch == 1
    assert "sampling rows of 3 ran out of memory; 1 at a time" in caplog.messages
    assert_same_images(out, models[family.K22].generate(rows))
