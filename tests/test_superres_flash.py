"""KandiSuperRes Flash x2 on tiny random checkpoints in the published formats."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from k3batch.model import movq as movqmod
from k3batch.model.superres.flash import (
    CONTEXT_FILE,
    CONTEXT_MASK_FILE,
    SR_FILE,
    KandiSuperResFlash,
    load_context,
)
from k3batch.model.superres.sr_unet import TINY_SR_UNET
from k3batch.model.superres.tiles import blend_tiles, tile_starts
from k3batch.testing.tiny import make_tiny
from k3batch.testing.tiny_sr import make_tiny_sr_flash

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    return make_tiny_sr_flash(str(root / "sr")), make_tiny(str(root / "k3"), layout="reference")


@pytest.fixture(scope="module")
def model(paths):
    sr, k3 = paths
    return KandiSuperResFlash.from_pretrained(sr, k3, device="cpu", config=TINY_SR_UNET)


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_sizes_seeds_and_batch_independence(model):
    a, b = _image(40, 64, 0), _image(32, 32, 1)
    out = model.upscale([a, b], [1, 2])
    assert [o.shape for o in out] == [(80, 128, 3), (64, 64, 3)]
    assert model.scale == 2
    # Alone and one refine tile per UNet call: the same pixels (up to float rounding of
    # another batch shape in the UNet's kernels).
    model.max_tiles_per_call = 1
    try:
        alone = model.upscale([b], [2])[0]
    finally:
        model.max_tiles_per_call = 4
    np.testing.assert_allclose(alone.astype(int), out[1].astype(int), atol=1)
    other = model.upscale([b], [3])[0]
    assert not np.array_equal(other, alone)


def test_sr_steps_against_hand_written_x0_sampler(model):
    """Four x0 steps at 979/729/479/229, q_sample with fresh noise on linear betas."""
    image, seed = _image(32, 64, 9), 11
    row = model._row(image, seed)
    got = model.sr(row)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 3, 64, 128), generator=g)
    low = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    for t in (979, 729, 479, 229):
        noise = torch.randn(x.shape, generator=g)
        x_t = float(np.sqrt(abar[t])) * x + float(np.sqrt(1 - abar[t])) * noise
        x = model.unet(x_t, torch.tensor([float(t)]), low)  # the UNet resizes low itself
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-4)


def test_blend_of_identical_crops_is_the_latent():
    """Tiles cut from one latent blend back into it exactly (the ramps mix equal values)."""
    z = torch.randn(1, 4, 40, 50)
    tile, overlap = 16, 0.25
    tiles = [
        [z[:, :, a : a + tile, c : c + tile].clone() for c in tile_starts(50, tile, overlap)]
        for a in tile_starts(40, tile, overlap)
    ]
    torch.testing.assert_close(blend_tiles(tiles, tile, overlap), z)
    assert tile_starts(40, tile, overlap) == [0, 12, 24, 36]


def test_blend_ramps_toward_the_later_tile():
    a, b = torch.zeros(1, 1, 4, 8), torch.ones(1, 1, 4, 8)
    out = blend_tiles([[a, b]], tile=8, overlap=0.25)  # extent 2, keep 6
    assert out.shape == (1, 1, 4, 12)
    torch.testing.assert_close(out[0, 0, 0, 6:9], torch.tensor([0.0, 0.5, 1.0]))


def test_blend_ramps_every_row_from_the_blended_row_above():
    """Three rows of constant tiles 0, 1, 2 (extent 2, keep 6): each row's first two lines
    ramp from the last lines of the row above as blended (row 1's are 1, not 0)."""
    col = [[torch.full((1, 1, 8, 4), float(v))] for v in (0, 1, 2)]
    out = blend_tiles(col, tile=8, overlap=0.25)
    want = [0.0] * 6 + [0.0, 0.5, 1, 1, 1, 1] + [1, 1.5, 2, 2, 2, 2]
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor(want))


def test_blend_of_edge_tiles_narrower_than_the_ramp_is_the_latent():
    """A 38 x 38 latent in tiles of 16 every 12: the last row and column are 2 wide, less than
    the 4 of the ramp, and still blend back into the latent."""
    z = torch.randn(1, 4, 38, 38)
    starts = tile_starts(38, 16, 0.25)
    assert starts == [0, 12, 24, 36]
    tiles = [[z[:, :, a : a + 16, c : c + 16].clone() for c in starts] for a in starts]
    torch.testing.assert_close(blend_tiles(tiles, 16, 0.25), z)


def test_pickled_objects_and_missing_context_are_refused(paths, tmp_path):
    sr, k3 = paths
    folder = tmp_path / "bad"
    make_tiny_sr_flash(str(folder))
    torch.save({"unet": {"x": torch.zeros(1)}, "evil": _Evil()}, folder / SR_FILE)
    with pytest.raises(Exception, match="Unsupported|weights_only|WeightsUnpickler"):
        KandiSuperResFlash.from_pretrained(str(folder), k3, device="cpu", config=TINY_SR_UNET)
    make_tiny_sr_flash(str(folder))
    (folder / CONTEXT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="context_path"):
        KandiSuperResFlash.from_pretrained(str(folder), k3, device="cpu", config=TINY_SR_UNET)
    make_tiny_sr_flash(str(folder))
    state = torch.load(folder / SR_FILE, weights_only=True)
    state["unet"].pop(next(iter(state["unet"])))
    torch.save(state, folder / SR_FILE)
    with pytest.raises(RuntimeError, match="Missing key"):
        KandiSuperResFlash.from_pretrained(str(folder), k3, device="cpu", config=TINY_SR_UNET)


class _Evil:
    pass


def test_loading_takes_the_file_and_finds_the_context_in_weights(paths, model, tmp_path):
    """The KandiSuperRes repo's layout: `path` the .pt file itself, the context in its
    folder's `weights/`; the device found by default (the CPU here): the fixture's model."""
    sr, k3 = paths
    repo = tmp_path / "repo"
    make_tiny_sr_flash(str(repo / "weights"))
    (repo / "weights" / SR_FILE).rename(repo / SR_FILE)
    loaded = KandiSuperResFlash.from_pretrained(str(repo / SR_FILE), k3, config=TINY_SR_UNET)
    assert loaded.device == torch.device("cpu")
    want = model.unet.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.unet.state_dict().items())
    assert torch.equal(loaded.context, model.context)
    assert torch.equal(loaded.context_mask, model.context_mask)
    half = KandiSuperResFlash.from_pretrained(
        sr, k3, device="cpu", dtype="bfloat16", config=TINY_SR_UNET
    )
    assert half.dtype == next(half.unet.parameters()).dtype == torch.bfloat16
    # the Flash UNet in the dtype asked for, the MoVQ in float32 as the reference runs it
    assert half.refiner.dtype == torch.bfloat16
    assert next(half.movq.parameters()).dtype == torch.float32
    # The SR steps cast the UNet's inputs to its dtype (its first layer refuses float32).
    image = _image(32, 32, 5)
    got, want = half.sr(half._row(image, 7)), model.sr(model._row(image, 7))
    diff = (got - want).abs().mean()
    assert got.dtype == torch.float32 and diff < 0.05, diff
    # and the refine gives the bfloat16 Flash UNet its context in its dtype
    (got,), (want,) = half.upscale([image], [7]), model.upscale([image], [7])
    assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 8


class _CountingRefiner:
    """The Flash refiner, recording the batch shape of each call."""

    def __init__(self, refiner):
        self.refiner, self.calls = refiner, []
        self.device, self.dtype = refiner.device, refiner.dtype

    def __call__(self, x, *args):
        self.calls.append(tuple(x.shape))
        return self.refiner(x, *args)


def test_refine_tiles_of_equal_shape_from_any_rows_share_calls_of_at_most_the_limit(model):
    """Three 32x32 and two 32x64 images: one refine tile each, of 8x8 and 8x16 latents; at
    most two a call: calls of 2 and 1 tiles of 8x8, and one of 2 tiles of 8x16."""
    counted = _variant(model, refiner=_CountingRefiner(model.refiner), max_tiles_per_call=2)
    images = [_image(32, 32, 1), _image(32, 64, 2), _image(32, 32, 3), _image(32, 64, 4)]
    counted.upscale([*images, _image(32, 32, 5)], [1, 2, 3, 4, 5])
    assert sorted(counted.refiner.calls) == [(1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 16)]


def test_flash_x2_needs_no_text_encoder_weights(paths, model, tmp_path):
    """The refine runs on the fixed context: a Kandinsky 3 checkpoint copied without T5's
    weights (about 20 GB in the real one) loads, with the fixture's refiner and sampling
    settings passed through."""
    sr, k3 = paths
    bare = tmp_path / "k3"
    shutil.copytree(k3, bare)
    for name in ("model.safetensors", "config.json"):
        (bare / "weights" / "flan_ul2_encoder" / name).unlink()
    loaded = KandiSuperResFlash.from_pretrained(
        sr, str(bare), device="cpu", config=TINY_SR_UNET, max_tiles_per_call=3
    )
    assert loaded.max_tiles_per_call == 3
    want = model.refiner.unet.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.refiner.unet.state_dict().items())
    assert torch.equal(loaded.refiner.null_embedding, model.refiner.null_embedding)


def test_bad_contexts_and_dtypes_are_refused_with_the_exact_message(paths, tmp_path):
    sr, k3 = paths
    with pytest.raises(ValueError) as e:
        KandiSuperResFlash.from_pretrained(sr, k3, device="cpu", dtype="fp8")
    assert str(e.value) == "dtype: 'fp8', expected one of ['bfloat16', 'float16', 'float32']"
    context = torch.zeros(1, 6, 4)
    cases = [
        (context[0], torch.ones(1, 6), "context (6, 4) / mask (1, 6)"),
        (context, torch.ones(1, 5), "context (1, 6, 4) / mask (1, 5)"),
        (context, torch.ones(6), "context (1, 6, 4) / mask (6,)"),
    ]
    for i, (c, m, shapes) in enumerate(cases):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        torch.save(c, folder / CONTEXT_FILE)
        torch.save(m, folder / CONTEXT_MASK_FILE)
        with pytest.raises(ValueError) as e:
            load_context(str(folder))
        assert str(e.value) == f"context_path: {shapes} are not [1, L, C] / [1, L]"
    torch.save({"context": context}, folder / CONTEXT_FILE)
    with pytest.raises(ValueError) as e:
        load_context(str(folder))
    assert str(e.value) == f"context_path: {folder / CONTEXT_FILE} does not hold one tensor"
    (folder / CONTEXT_MASK_FILE).unlink()
    torch.save(context, folder / CONTEXT_FILE)
    with pytest.raises(FileNotFoundError) as e:
        load_context(str(folder))
    assert str(e.value) == (
        f"context_path: {str(folder)!r} has no {CONTEXT_MASK_FILE} (the KandiSuperRes repo's "
        "weights/)"
    )
    good = tmp_path / "good"
    good.mkdir()
    torch.save(context.half(), good / CONTEXT_FILE)
    torch.save(torch.ones(1, 6, dtype=torch.int32), good / CONTEXT_MASK_FILE)
    c, m = load_context(str(good))
    assert c.dtype == torch.float32 and m.dtype == torch.long and m.shape == (1, 6)


def test_bad_input(model):
    with pytest.raises(ValueError) as e:
        model.upscale([_image(16, 64, 0)], [1])
    assert str(e.value) == "images[0]: sides must be >= 32 px, got (16, 64)"
    with pytest.raises(ValueError, match="seeds"):
        model.upscale([_image(32, 32, 0)], [1, 2])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        model.upscale([np.zeros((32, 32), np.uint8)], [1])


def _variant(model, movq=None, refiner=None, **settings) -> KandiSuperResFlash:
    """The fixture's parts (or the `movq` / `refiner` given) with other sampling settings
    (tiny tiles, windows, threshold)."""
    return KandiSuperResFlash(
        model.unet,
        refiner or model.refiner,
        movq or model.movq,
        model.context,
        model.context_mask,
        **settings,
    )


class _PatchMoVQ(torch.nn.Module):
    """A MoVQ stand-in where each latent depends on its own 8x8 pixels only and each pixel
    on its own latent: tiles see no neighbours, so tiled and whole must agree (the decode's
    blend mixes equal values). Records the shape of every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_latent = torch.nn.Conv2d(3, 4, 1)
        self.to_pixels = torch.nn.Conv2d(4, 3, 1)
        self.calls = []

    def encode(self, x):
        self.calls.append(("encode", tuple(x.shape[-2:])))
        return SimpleNamespace(latents=self.to_latent(F.avg_pool2d(x, 8)))

    def decode(self, z, force_not_quantize=False):
        self.calls.append(("decode", tuple(z.shape[-2:])))
        return SimpleNamespace(sample=F.interpolate(self.to_pixels(z), scale_factor=8.0))


def test_movq_tiles_above_the_tile_side_and_stitch_back_to_the_whole(model):
    """Tile 32 px (4 latents): encode tiles of 32 every 32, decode tiles of 4 latents every
    3; with a MoVQ that sees no neighbours the tiled results equal the whole ones."""
    fake = _PatchMoVQ()
    flash = _variant(model, fake, movq_tile=32)
    x = torch.randn(1, 3, 72, 104)
    with torch.no_grad():
        whole_z = fake.encode(x).latents
        whole_x = fake.decode(whole_z).sample
        fake.calls.clear()
        z = flash.encode(x)
        encodes = list(fake.calls)
        fake.calls.clear()
        y = flash.decode(whole_z)
    torch.testing.assert_close(z, whole_z)
    torch.testing.assert_close(y, whole_x)
    # 3 x 4 encode tiles (the last ones 8 px), 3 x 5 decode tiles (starts every 3 latents).
    assert len(encodes) == 12 and max(max(s) for _, s in encodes) == 32
    assert encodes[:4] == [("encode", (32, 32))] * 3 + [("encode", (32, 8))]
    assert len(fake.calls) == 15 and max(max(s) for _, s in fake.calls) == 4
    # Up to the tile side: one call on the whole, as before.
    fake.calls.clear()
    with torch.no_grad():
        flash.encode(x[:, :, :32, :32])
        flash.decode(whole_z[:, :, :4, :4])
    assert fake.calls == [("encode", (32, 32)), ("decode", (4, 4))]


def test_tiled_movq_against_hand_blended_tiles(model):
    """The tiny MoVQ itself, tile 32 px: encode is the three tiles side by side; decode of a
    3x7 latent (tiles at 0, 3, 6 latents: 32, 32 and 8 px wide) is each tile's decode, the
    next one faded in linearly over 8 px over the previous one's last 8 px."""
    flash = _variant(model, movq_tile=32)
    movq = model.movq
    x = torch.rand(1, 3, 32, 72) * 2 - 1
    z = torch.randn(1, 4, 3, 7)
    with torch.no_grad():
        enc = [movqmod.encode(movq, x[:, :, :, c : c + 32]) for c in (0, 32, 64)]
        dec = [
            movq.decode(z[:, :, :, c : c + 4], force_not_quantize=True).sample for c in (0, 3, 6)
        ]
        got_z, got_x = flash.encode(x), flash.decode(z)
    torch.testing.assert_close(got_z, torch.cat(enc, dim=3))
    ramp = torch.arange(8) / 8
    d0, d1, d2 = dec
    want = torch.cat(
        [
            d0[..., :24],
            d0[..., 24:32] * (1 - ramp) + d1[..., :8] * ramp,
            d1[..., 8:24],
            d1[..., 24:32] * (1 - ramp) + d2 * ramp,
        ],
        dim=3,
    )
    assert got_x.shape == (1, 3, 24, 56)
    torch.testing.assert_close(got_x, want)


def _unet_inputs(unet):
    shapes = []
    handle = unet.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_large_canvases_run_the_sr_steps_in_bounded_windows(model):
    """Above the threshold (lowered to 64 px: 4096 px^2) a 128x192 canvas runs in windows of
    64 every 48 (3 x 4), two per UNet call; the result is the per-pixel mean of the windows'
    x0 at each step (a hand-written MultiDiffusion loop, one window per call)."""
    image, seed = _image(64, 96, 3), 5
    flash = _variant(model, whole_canvas_side=64, window=64, stride=48, max_tiles_per_call=2)
    shapes, handle = _unet_inputs(model.unet)
    try:
        (got,) = flash.sr_steps([flash._row(image, seed)])
        windowed = list(shapes)
        shapes.clear()
        (whole,) = model.sr_steps([model._row(image, seed)])
    finally:
        handle.remove()
    assert windowed == [(2, 3, 64, 64)] * 6 * 4
    assert shapes == [(1, 3, 128, 192)] * 4  # the default threshold: the whole canvas
    assert not torch.allclose(got, whole)

    row = model._row(image, seed)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    x = torch.randn((1, 3, 128, 192), generator=row.generator)
    for t in (979, 729, 479, 229):
        noise = torch.randn(x.shape, generator=row.generator)
        x_t = float(np.sqrt(abar[t])) * x + float(np.sqrt(1 - abar[t])) * noise
        total, count = torch.zeros_like(x), torch.zeros_like(x)
        for a in (0, 48, 64):
            for c in (0, 48, 96, 128):
                crop = (slice(None), slice(None), slice(a, a + 64), slice(c, c + 64))
                with torch.no_grad():
                    total[crop] += model.unet(x_t[crop], torch.tensor([float(t)]), row.lowres[crop])
                count[crop] += 1
        x = total / count
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-4)


def test_one_window_over_the_canvas_is_the_whole_canvas_bit_for_bit(model):
    """The windowed path draws the same noise in the same order as the whole one."""
    image = _image(32, 64, 4)
    flash = _variant(model, whole_canvas_side=64, window=128, stride=128)
    row = flash._row(image, 8)
    assert not flash.runs_whole(row) and model.runs_whole(model._row(image, 8))
    (got,) = flash.sr_windows([row])
    assert torch.equal(got, model.sr(model._row(image, 8)))


def test_windowed_and_tiled_images_do_not_depend_on_the_batch(model):
    """Windows of two images share UNet calls, MoVQ runs in 64 px tiles: each image is the
    one it is alone (up to float rounding of other batch shapes)."""
    a, b = _image(64, 96, 6), _image(32, 64, 7)
    flash = _variant(
        model, whole_canvas_side=64, window=64, stride=48, max_tiles_per_call=3, movq_tile=64
    )
    both = flash.upscale([a, b], [1, 2])
    assert [o.shape for o in both] == [(128, 192, 3), (64, 128, 3)]
    for image, seed, out in ((a, 1, both[0]), (b, 2, both[1])):
        (alone,) = flash.upscale([image], [seed])
        np.testing.assert_allclose(alone.astype(int), out.astype(int), atol=1)


def test_settings_are_refused_with_the_exact_message_and_their_bounds_taken(model):
    for settings, message in [
        (dict(whole_canvas_side=0), "whole_canvas_side: 0, expected >= 1"),
        (dict(movq_tile=0), "movq_tile: 0, expected a positive multiple of 32"),
        (dict(movq_tile=48), "movq_tile: 48, expected a positive multiple of 32"),
        (dict(movq_tile=-32), "movq_tile: -32, expected a positive multiple of 32"),
    ]:
        with pytest.raises(ValueError) as e:
            _variant(model, **settings)
        assert str(e.value) == message
    assert _variant(model, whole_canvas_side=1, movq_tile=32).movq_tile == 32
    assert model.refine is True  # the reference's Flash x2 refines by default
    # A canvas of exactly whole_canvas_side squared pixels runs whole; a larger one does not.
    edge = _variant(model, whole_canvas_side=64)
    assert edge.runs_whole(edge._row(_image(32, 32, 1), 1))
    assert not edge.runs_whole(edge._row(_image(64, 32, 1), 1))
