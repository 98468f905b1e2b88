"""KandiSuperRes core: the published checkpoint's names and container, safe loading, and the
reference's x4 / x2 sampling (DPM-Solver++ with MultiDiffusion windows) on a tiny model.

Windows are scaled down (32 px every 24 px) so a 14x18 input (56x72 canvas at x4) spans
2x3 windows. The sampler, the windows and x2 are checked against oracles written here from
the paper and docs/superres.md (no k3batch sampling code in them). Agreement with the
reference's own code is checked by scripts/check_reference_sr.py, which needs a checkout of
ai-forever/KandiSuperRes.
"""

import math
import os
import pickle

import numpy as np
import pytest
import torch

from k3batch.model.superres.pipeline import (
    CHECKPOINTS,
    KandiSuperRes,
    checkpoint_state,
    solver,
    window_starts,
)
from k3batch.model.superres.sr_unet import SR_UNET, TINY_SR_UNET, SRUNet
from k3batch.testing.tiny_sr import make_tiny_sr

SAMPLING = dict(window=32, stride=24)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    return {s: make_tiny_sr(str(root / name), s) for s, name in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def x4(files):
    return KandiSuperRes.from_pretrained(
        files[4], 4, "cpu", config=TINY_SR_UNET, max_tiles_per_call=4, **SAMPLING
    )


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def test_the_tiny_file_is_a_flat_state_dict_with_the_unets_names(files):
    state = torch.load(files[4], weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    expected = {k: v.shape for k, v in SRUNet(**TINY_SR_UNET).state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == expected
    # noisy image + low-resolution image in, 3 channels out; no prefix on the names
    assert state["init_conv.weight"].shape == (8, 6, 3, 3)
    assert state["out_conv.weight"].shape == (3, 8, 3, 3)
    other = torch.load(files[2], weights_only=True)
    assert not torch.equal(state["init_conv.weight"], other["init_conv.weight"])


def test_the_published_architecture_has_the_reference_checkpoints_names():
    with torch.device("meta"):
        state = SRUNet(**SR_UNET).state_dict()
    # The reference's UNet_sr with get_sr_model's arguments, counted on the meta device
    # (scripts/check_reference_sr.py compares every name and shape).
    assert len(state) == 496
    assert sum(math.prod(v.shape) for v in state.values()) == 413_205_251
    shapes = {
        "to_time_embed.1.weight": (512, 128),
        "init_conv.weight": (128, 6, 3, 3),
        # level 0 halves at its first block: 4x4 stride-2 conv, on the skip path too
        "down_samples.0.resnet_attn_blocks.0.0.in_block.change_resolution.change_resolution.weight": (
            128,
            128,
            4,
            4,
        ),
        "down_samples.0.resnet_attn_blocks.0.0.change_resolution.change_resolution.weight": (
            128,
            128,
            4,
            4,
        ),
        "down_samples.3.resnet_attn_blocks.7.0.time_mlp.1.weight": (2048, 512),
        # the first up level reads the deepest features without a skip and does not double
        "up_samples.0.resnet_attn_blocks.0.0.in_block.projection.weight": (1024, 1024, 3, 3),
        "up_samples.1.resnet_attn_blocks.0.0.in_block.projection.weight": (512, 1024, 3, 3),
        "up_samples.1.resnet_attn_blocks.7.0.res_block.weight": (256, 512, 1, 1),
        "up_samples.3.resnet_attn_blocks.1.0.out_block.projection.weight": (128, 128, 3, 3),
        "out_conv.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert "up_samples.0.resnet_attn_blocks.0.0.res_block.weight" not in state


def test_loading_is_strict_and_takes_the_unet_container(files, tmp_path):
    state = torch.load(files[4], weights_only=True)
    missing, extra = dict(state), {**state, "unet.extra": torch.zeros(1)}
    del missing["out_conv.bias"]
    for name, bad in (("missing", missing), ("extra", extra)):
        torch.save(bad, tmp_path / name)
        with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
            KandiSuperRes.from_pretrained(str(tmp_path / name), 4, "cpu", config=TINY_SR_UNET)
    # {"unet": state} (the Flash x2 file's container) loads the same weights
    torch.save({"unet": state}, tmp_path / "wrapped.pt")
    wrapped = KandiSuperRes.from_pretrained(
        str(tmp_path / "wrapped.pt"), 4, "cpu", config=TINY_SR_UNET
    )
    assert all(torch.equal(v, state[k]) for k, v in wrapped.unet.state_dict().items())
    # a folder: the published file name for the scale
    folder = KandiSuperRes.from_pretrained(os.path.dirname(files[2]), 2, config=TINY_SR_UNET)
    assert folder.scale == 2
    assert torch.equal(
        folder.unet.init_conv.weight, torch.load(files[2], weights_only=True)["init_conv.weight"]
    )


class Payload:
    """Unpickling this runs os.mkdir(path): what an untrusted pickle could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(files, tmp_path):
    marker = tmp_path / "ran"
    state = dict(torch.load(files[4], weights_only=True))
    state["extra"] = Payload(str(marker))
    torch.save(state, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        KandiSuperRes.from_pretrained(str(tmp_path / "evil.ckpt"), 4, "cpu", config=TINY_SR_UNET)
    assert not marker.exists()
    # The payload is live: an unrestricted load runs it.
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.is_dir()


def test_windows_follow_the_references_rule():
    # ceil((side - window) / stride) + 1 windows every stride, the last flush with the end
    assert window_starts(4096, 1024, 800) == [0, 800, 1600, 2400, 3072]
    assert window_starts(1024, 1024, 800) == [0]
    assert window_starts(1800, 1024, 800) == [0, 776]
    assert window_starts(72, 32, 24) == [0, 24, 40]


def test_outputs_are_the_input_times_the_scale(files, x4):
    x2 = KandiSuperRes.from_pretrained(files[2], 2, "cpu", config=TINY_SR_UNET, **SAMPLING)
    # x2 of 10x14: a 20x28 canvas fits one window but is not a multiple of 8 (the reference
    # breaks there); it runs on 24x32 and is resized. 7x9 is odd: the reference's even canvas.
    for model, im in ((x4, image(14, 18)), (x2, image(10, 14)), (x2, image(7, 9))):
        (out,) = model.upscale([im], [3], num_inference_steps=2)
        assert out.dtype == np.uint8
        assert out.shape == (im.shape[0] * model.scale, im.shape[1] * model.scale, 3)
    assert (
        x2.canvas_side(10) == 24
        and x2.canvas_side(12) == 24
        and x2.canvas_side(7) == 16
        and x4.canvas_side(7) == 32
    )


def test_an_image_depends_on_its_seed_not_its_batch_or_the_tile_calls(files, x4):
    big, small, other = image(14, 18, 1), image(8, 8, 2), image(14, 18, 3)
    one_per_call = KandiSuperRes.from_pretrained(
        files[4], 4, "cpu", config=TINY_SR_UNET, max_tiles_per_call=1, **SAMPLING
    )
    (alone,) = one_per_call.upscale([big], [5], num_inference_steps=3)
    together = x4.upscale([small, big, other], [4, 5, 5], num_inference_steps=3)
    # Batch shapes may change a CPU kernel's rounding: one grey level at most.
    assert np.abs(alone.astype(int) - together[1]).max() <= 1
    (again,) = one_per_call.upscale([big], [5], num_inference_steps=3)
    assert np.array_equal(alone, again)
    (reseeded,) = one_per_call.upscale([big], [6], num_inference_steps=3)
    assert np.abs(alone.astype(int) - reseeded).mean() > 5


def _dpm_solver_pp_2m(unet, lowres, noise, times):
    """DPM-Solver++(2M) written from the paper (Lu et al. 2022, Algorithm 2) in float64 on
    the reference's schedule (linear betas 1e-4..0.02, 1000 steps), data prediction, first
    order on the first and the last step, the last step ending at sigma = 0."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = alpha.log() - sigma.log()
    x, previous, h_previous = noise.double(), None, None
    for i, t in enumerate(times):
        d = unet(x.float(), torch.full((1,), float(t)), lowres).double()
        if i == len(times) - 1:
            return d  # alpha = 1, sigma = 0: the update is the data prediction itself
        s = times[i + 1]
        h = lam[s] - lam[t]
        if previous is None:
            corrected = d
        else:
            r = h_previous / h
            corrected = d + (d - previous) / (2 * r)
        x = sigma[s] / sigma[t] * x - alpha[s] * torch.expm1(-h) * corrected
        previous, h_previous = d, h


def test_sampling_matches_dpm_solver_from_the_paper(x4):
    # 8x8 at x4 is one 32x32 window: the MultiDiffusion mean is the window itself.
    im = image(8, 8, 7)
    times = [999, 799, 599, 400, 200]  # linspace(0, 999, 6), rounded, reversed, without 0
    assert solver(5).timesteps.tolist() == times
    (out,) = x4.upscale([im], [11], num_inference_steps=5)
    lowres = torch.from_numpy(im).permute(2, 0, 1)[None].float().div(255) * 2 - 1
    lowres = torch.nn.functional.interpolate(lowres, (32, 32), mode="bilinear")
    noise = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        x0 = _dpm_solver_pp_2m(x4.unet, lowres, noise, times)
    expected = ((x0 + 1) / 2).clamp(0, 1)[0].mul(255).byte().permute(1, 2, 0).numpy()
    assert np.abs(expected.astype(int) - out).max() <= 1
    # and the sampler is not blind to the solver: one step less is another image
    (fewer,) = x4.upscale([im], [11], num_inference_steps=4)
    assert np.abs(fewer.astype(int) - out).mean() > 1


def _starts(side, window, stride):
    """Window offsets along a side as docs/superres.md says: windows of `window` every
    `stride`, the last flush with the edge; one window of the side when it is no longer."""
    if side <= window:
        return [0]
    return [*range(0, side - window, stride), side - window]


def _multidiffusion_oracle(unet, image, seed, scale, steps, window, stride):
    """KandiSuperRes x4 / x2 from its description (docs/superres.md) in float64: the canvas
    (odd sides rounded up to even, then times the scale; at most one window and not a multiple
    of 8: up to one), the bilinearly resized low-resolution image, the seed's noise, and
    DPM-Solver++(2M) from the paper per window, each with its own history, the canvas the
    per-pixel mean of the windows after every step; then clip, bilinear align_corners back to
    the output size for odd sides, x255 truncated. The UNet sees one window per call."""
    h, w = image.shape[:2]

    def canvas(side):
        c = (side + side % 2) * scale
        return c + (-c) % 8 if c <= window else c

    ch, cw = canvas(h), canvas(w)
    lowres = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255) * 2 - 1
    lowres = torch.nn.functional.interpolate(lowres, (ch, cw), mode="bilinear")
    x = torch.randn((1, 3, ch, cw), generator=torch.Generator().manual_seed(seed)).double()
    wh, ww = min(ch, window), min(cw, window)
    views = [
        (a, a + wh, c, c + ww)
        for a in _starts(ch, window, stride)
        for c in _starts(cw, window, stride)
    ]
    times = np.round(np.linspace(0, 999, steps + 1))[::-1][:-1].astype(int).tolist()
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = alpha.log() - sigma.log()
    history = {}  # window -> (its previous data prediction, h)
    for i, t in enumerate(times):
        total, count = torch.zeros_like(x), torch.zeros_like(x)
        for v, (a, b, c, d) in enumerate(views):
            xw = x[:, :, a:b, c:d]
            time = torch.full((1,), float(t))
            pred = unet(xw.float(), time, lowres[:, :, a:b, c:d]).double()
            if i == len(times) - 1:
                new = pred  # first order to sigma = 0: the data prediction
            else:
                s = times[i + 1]
                step = lam[s] - lam[t]
                corrected = pred
                if v in history:
                    previous, h_previous = history[v]
                    corrected = pred + (pred - previous) / (2 * h_previous / step)
                new = sigma[s] / sigma[t] * xw - alpha[s] * torch.expm1(-step) * corrected
                history[v] = (pred, step)
            total[:, :, a:b, c:d] += new
            count[:, :, a:b, c:d] += 1
        x = total / count
    out = ((x + 1) / 2).clamp(0, 1)
    if (ch, cw) != (h * scale, w * scale):
        out = torch.nn.functional.interpolate(
            out, (h * scale, w * scale), mode="bilinear", align_corners=True
        )
    return out[0].mul(255).byte().permute(1, 2, 0).numpy(), len(views)


def test_windows_and_x2_match_a_float64_multidiffusion_oracle(files, x4):
    """x4 on 2x3 overlapping windows; x2 on 3x2 windows with an odd side (resized back) and
    on a one-window canvas rounded up to a multiple of 8: three rows of one batch, each
    against the oracle alone (4 steps: second-order steps run)."""
    x2 = KandiSuperRes.from_pretrained(
        files[2], 2, "cpu", config=TINY_SR_UNET, max_tiles_per_call=3, **SAMPLING
    )
    cases = [
        (x4, image(14, 18, 21), 31, 6),
        (x2, image(31, 22, 22), 32, 6),
        (x2, image(7, 9, 23), 33, 1),
    ]
    x2_out = x2.upscale([cases[1][1], cases[2][1]], [32, 33], num_inference_steps=4)
    (x4_out,) = x4.upscale([cases[0][1]], [31], num_inference_steps=4)
    for (model, im, seed, windows), got in zip(cases, [x4_out, *x2_out], strict=True):
        with torch.no_grad():
            want, n = _multidiffusion_oracle(model.unet, im, seed, model.scale, 4, 32, 24)
        assert n == windows and got.shape == want.shape
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize(
    "images, seeds, message",
    [
        ([image(8, 8).astype(np.float32)], [1], "images[0]: expected a uint8 numpy array"),
        ([[[1, 2, 3]]], [1], "images[0]: expected a uint8 numpy array"),
        (
            [image(8, 8)[:, :, 0]],
            [1],
            "images[0]: expected shape HxWx3 with H, W > 0, got (8, 8)",
        ),
        (
            [np.zeros((8, 8, 4), np.uint8)],
            [1],
            "images[0]: expected shape HxWx3 with H, W > 0, got (8, 8, 4)",
        ),
        (
            [image(8, 8), np.zeros((0, 5, 3), np.uint8)],
            [1, 2],
            "images[1]: expected shape HxWx3 with H, W > 0, got (0, 5, 3)",
        ),
        ([], [], "images: expected a non-empty list of HxWx3 uint8 arrays"),
        (image(8, 8), [1], "images: expected a non-empty list of HxWx3 uint8 arrays"),
        ([image(8, 8)], [1, 2], "seeds: expected a list of 1 ints, one per image"),
        ([image(8, 8)], 1, "seeds: expected a list of 1 ints, one per image"),
        ([image(8, 8)], [1.5], "seeds[0]: expected an int, got 1.5"),
        ([image(8, 8)], [True], "seeds[0]: expected an int, got True"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(x4, images, seeds, message):
    with pytest.raises(ValueError) as e:
        x4.upscale(images, seeds)
    assert str(e.value) == message


def test_bad_settings_are_refused_with_the_exact_message(x4):
    for steps in (0, 2.0, True):
        with pytest.raises(ValueError) as e:
            x4.upscale([image(8, 8)], [1], num_inference_steps=steps)
        assert str(e.value) == f"num_inference_steps: expected an int >= 1, got {steps!r}"
    for settings, message in [
        (dict(window=30), "window: 30, expected a positive multiple of 8"),
        (dict(window=0), "window: 0, expected a positive multiple of 8"),
        (dict(window=32, stride=40), "stride: 40, expected 1..window (32)"),
        (dict(window=32, stride=0), "stride: 0, expected 1..window (32)"),
        (dict(max_tiles_per_call=0), "max_tiles_per_call: 0, expected >= 1"),
    ]:
        with pytest.raises(ValueError) as e:
            KandiSuperRes(x4.unet, 4, **settings)
        assert str(e.value) == message
    # the bounds themselves are accepted: a stride of the window, one tile a call
    KandiSuperRes(x4.unet, 4, window=32, stride=32, max_tiles_per_call=1)
    KandiSuperRes(x4.unet, 4, window=8, stride=1)


def test_bad_checkpoints_scales_and_dtypes_are_refused_with_the_exact_message(files, x4):
    state = {"w": torch.zeros(1)}
    assert checkpoint_state(state) is state and checkpoint_state({"unet": state}) is state
    bad = "checkpoint: expected a state dict of tensors (or {'unet': state})"
    for obj in ([torch.zeros(1)], torch.zeros(1), {"w": 1.0}, {"unet": {"w": "x"}}):
        with pytest.raises(ValueError) as e:
            checkpoint_state(obj)
        assert str(e.value) == bad
    for make in (
        lambda: KandiSuperRes(x4.unet, 3),
        lambda: KandiSuperRes.from_pretrained(files[4], 3, config=TINY_SR_UNET),
    ):
        with pytest.raises(ValueError) as e:
            make()
        assert str(e.value) == "scale: 3, expected one of [2, 4]"
    with pytest.raises(ValueError) as e:
        KandiSuperRes.from_pretrained(files[4], 4, dtype="fp8", config=TINY_SR_UNET)
    assert str(e.value) == "dtype: 'fp8', expected one of ['bfloat16', 'float16', 'float32']"


def test_the_default_scale_is_x4_and_a_dtype_runs_the_unet_in_it(files, x4):
    """The UNet's inputs (noisy window, time, low-resolution window) are cast to its dtype, as
    the reference does: a bfloat16 UNet runs (a float32 input would be refused by its first
    layer) and lands near the float32 image."""
    assert KandiSuperRes.from_pretrained(files[4], device="cpu", config=TINY_SR_UNET).scale == 4
    half = KandiSuperRes.from_pretrained(
        files[4], 4, "cpu", "bfloat16", config=TINY_SR_UNET, **SAMPLING
    )
    assert half.dtype == next(half.unet.parameters()).dtype == torch.bfloat16
    im = image(14, 18, 9)
    (want,) = x4.upscale([im], [3], num_inference_steps=2)
    (got,) = half.upscale([im], [3], num_inference_steps=2)
    assert got.dtype == np.uint8 and got.shape == want.shape
    diff = np.abs(got.astype(int) - want)
    assert diff.mean() < 3 and diff.max() < 40, (diff.mean(), diff.max())


class _Counting(torch.nn.Module):
    """The UNet, recording the window shapes of each call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, lowres):
        self.calls.append(tuple(x.shape))
        return self.unet(x, t, lowres)


def test_windows_of_equal_shape_from_any_rows_share_unet_calls(files, x4):
    """14x18 at x4: 56x72, 2x3 windows of 32x32; 6x6: one 24x24 window; 8x8: one 32x32.
    Seven 32x32 windows in calls of at most 3, the 24x24 one alone: four calls a step."""
    counted = KandiSuperRes(_Counting(x4.unet), 4, max_tiles_per_call=3, **SAMPLING)
    images = [image(14, 18, 1), image(6, 6, 2), image(8, 8, 3)]
    counted.upscale(images, [1, 2, 3], num_inference_steps=1)
    assert counted.unet.calls == [(3, 3, 32, 32), (3, 3, 32, 32), (1, 3, 32, 32), (1, 3, 24, 24)]
