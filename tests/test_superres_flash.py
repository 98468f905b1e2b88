"""KandiSuperRes Flash x2 on tiny random checkpoints in the published formats."""

import numpy as np
import pytest
import torch

from k3batch.model.sr_unet import TINY_SR_UNET
from k3batch.model.superres_flash import (
    CONTEXT_FILE,
    SR_FILE,
    KandiSuperResFlash,
    blend_tiles,
    tile_starts,
)
from k3batch.testing.tiny import make_tiny
from k3batch.testing.tiny_sr import make_tiny_sr_flash


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


def test_bad_input(model):
    with pytest.raises(ValueError, match=r"images\[0\]: sides must be >= 32"):
        model.upscale([_image(16, 64, 0)], [1])
    with pytest.raises(ValueError, match="seeds"):
        model.upscale([_image(32, 32, 0)], [1, 2])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        model.upscale([np.zeros((32, 32), np.uint8)], [1])
