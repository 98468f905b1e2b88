"""k3batch against goldens recorded from the reference code (tests/goldens/).

`scripts/check_reference*.py --record` ran ai-forever's reference code (Kandinsky-3,
KandiSuperRes, kandinsky3-diffusers) on the tiny weights and kept each case's inputs, noise,
intermediate arrays and outputs with the reference's commit (`scripts/record_goldens.sh`
regenerates them all). Here k3batch's side of each case (`k3batch.testing.reference_goldens`,
the functions the scripts run) runs on the same weights, with no reference checkout, and
must match:

- the weights first: they must be the golden's, bit for bit or within float rounding (the
  tiny builders' random fills round differently on CPUs without AVX2), or the tiny set
  changed and the goldens must be regenerated (the message says how);
- noise draws within `NOISE_ATOL`: the same seeded generator stream, but torch's `randn`
  rounds differently without AVX2 (its scalar Box-Muller: up to 1.6e-6 apart from the
  vectorised one), and the reference ran with it;
- float arrays within `REL` of their largest value: the reference and k3batch are different
  implementations (the reference's own UNets and MoVQ against diffusers'), which differ by
  float32 rounding, ~4e-6 relative where the scripts measure them, and CPU kernels round
  differently per instruction set (AVX-512, AVX2, none);
- images within one grey level on at most 0.5% of their bytes (`assert_same_images`); the
  scripts measure at most 1 grey level on 7 bytes of 12288.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from k3batch.testing import reference_goldens as golden
from tests.conftest import assert_same_images

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
REL = 2e-5  # float arrays: max |diff| <= REL * max |golden| (scripts: up to ~4e-6)
NOISE_ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _golden(name: str) -> tuple[dict, dict]:
    return golden.load(GOLDENS, name)


def assert_weights(meta: dict, weights: dict) -> None:
    why = golden.weights_differ(meta["weights"], weights)
    assert why is None, (
        f"tiny set changed: {meta['case']} was recorded on other weights ({why}); "
        f"regenerate goldens with `{golden.RECORD_COMMAND}` (docs/testing.md, Reference goldens)"
    )


def assert_close(name: str, ours, theirs) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    scale = np.abs(theirs).max()
    d = np.abs(ours - theirs).max()
    assert d <= REL * scale, f"{name}: max |diff| {d:.3g} > {REL} x max |golden| {scale:.3g}"


def assert_noise(name: str, ours, theirs) -> None:
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    d = np.abs(ours - theirs).max()
    assert d <= NOISE_ATOL, f"{name}: max |diff| {d:.3g} > {NOISE_ATOL}"


def test_every_case_has_a_golden_and_every_golden_a_case():
    names = [c.name for c in golden.K3_CASES + golden.SR_CASES + golden.FLASH_CASES]
    names += [golden.CONTROLNET_CASE, golden.IP_ADAPTER_CASE]
    assert golden.cases(GOLDENS) == sorted(names)
    for name in names:
        _, meta = _golden(name)
        assert meta["reference"]["commit"] and meta["weights"]["sha256"], name


# --------------------------------------------------------------------------- Kandinsky 3
@pytest.fixture(scope="module")
def k3_models(tiny_ref_dir):
    from k3batch.model.kandinsky3.pipeline import Kandinsky3

    models = {}

    def get(member):
        if member not in models:
            models[member] = Kandinsky3.from_pretrained(
                tiny_ref_dir, member=member, dtype="float32", device="cpu"
            )
        return models[member]

    return get


@pytest.mark.parametrize("case", golden.K3_CASES, ids=lambda c: c.name)
def test_kandinsky3_matches_the_reference_pipeline(case, tiny_ref_dir, k3_models):
    theirs, meta = _golden(case.name)
    assert_weights(meta, golden.file_weights(tiny_ref_dir, golden.k3_files(case)))
    inputs = {k: theirs[k] for k in golden.k3_inputs(case)}
    ours = golden.k3_side(k3_models(case.member), case, inputs)
    assert_noise("first noise draw", ours["noise"], theirs["noise"])
    assert_close("final latent", ours["latent"], theirs["latent"])
    assert_same_images([ours["image"]], [theirs["image"]])


# --------------------------------------------------------------------------- KandiSuperRes
@pytest.fixture(scope="module")
def sr_files(tmp_path_factory):
    from k3batch.model.superres.pipeline import CHECKPOINTS
    from k3batch.testing.tiny_sr import make_tiny_sr

    root = tmp_path_factory.mktemp("sr-goldens")
    return str(root), {s: make_tiny_sr(str(root / name), s) for s, name in CHECKPOINTS.items()}


def _sr_params():
    # The real windows: a 1120x1048 canvas, ~25 s of k3batch on one thread.
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.subsample > 1 else [])
        for c in golden.SR_CASES
    ]


@pytest.mark.parametrize("case", _sr_params())
def test_superres_matches_the_reference_pipeline(case, sr_files):
    from k3batch.model.superres.pipeline import CHECKPOINTS

    root, files = sr_files
    theirs, meta = _golden(case.name)
    assert_weights(meta, golden.file_weights(root, [CHECKPOINTS[case.scale]]))
    picture = theirs["picture"] if "picture" in theirs else golden.sr_picture(case)
    ours = golden.subsampled(golden.sr_side(files[case.scale], case, picture), case.subsample)
    assert_close("canvas", ours["canvas"], theirs["canvas"])
    assert_same_images([ours["image"]], [theirs["image"]])


# --------------------------------------------------------------------------- Flash x2
@pytest.fixture(scope="module")
def flash(tmp_path_factory, tiny_ref_dir):
    from k3batch.model.superres.flash import KandiSuperResFlash
    from k3batch.model.superres.sr_unet import TINY_SR_UNET
    from k3batch.testing.tiny_sr import make_tiny_sr_flash

    folder = make_tiny_sr_flash(str(tmp_path_factory.mktemp("flash-goldens") / "sr"))
    model = KandiSuperResFlash.from_pretrained(
        folder, tiny_ref_dir, device="cpu", config=TINY_SR_UNET, refine=False
    )
    return folder, model


@pytest.mark.parametrize("case", golden.FLASH_CASES, ids=lambda c: c.name)
def test_flash_x2_matches_the_reference_pipeline(case, flash, tiny_ref_dir):
    folder, model = flash
    theirs, meta = _golden(case.name)
    assert_weights(meta, golden.flash_weights(folder, tiny_ref_dir, case))
    picture = theirs["picture"] if "picture" in theirs else golden.flash_picture(case)
    ours = golden.flash_arrays(golden.flash_side(model, case, picture), case)
    assert sorted(ours) == sorted(k for k in theirs if k != "picture")
    for name in (k for k in ours if k.startswith("noise_")):
        assert_noise(name, ours[name], theirs[name])
    for name in ("latent", "refined"):
        if name in ours:
            assert_close(name, ours[name], theirs[name])
    assert_same_images([ours["image"]], [theirs["image"]])


# --------------------------------------------------------------------------- adapters
def test_controlnet_residuals_match_the_forks():
    theirs, meta = _golden(golden.CONTROLNET_CASE)
    model = golden.controlnet_model()
    assert_weights(meta, golden.weights_summary(model.state_dict().items()))
    ours = golden.controlnet_side(model, theirs)
    assert sorted(ours) == sorted(k for k in theirs if k.startswith("residual_"))
    for name, value in ours.items():
        # Random weights grow the activations to ~1e4: the rounding is relative.
        assert_close(name, value, theirs[name])


def test_ip_adapter_unet_matches_the_forks(tmp_path):
    theirs, meta = _golden(golden.IP_ADAPTER_CASE)
    base = golden.ip_base_unet()
    adapter_file = golden.ip_adapter_file(str(tmp_path / "ip"), base)
    assert_weights(meta, golden.ip_weights(base, adapter_file))
    ours = golden.ip_side(base, adapter_file, theirs)
    for i in range(len(golden.IP_SCALES)):
        assert_close(f"scale_{i}", ours[f"scale_{i}"], theirs[f"scale_{i}"])
    # The image branch is live at every weight but 0: the golden tells the weights apart.
    moved = [np.abs(ours[f"scale_{i}"] - ours["plain"]).max() for i in range(4)]
    assert moved[0] == 0 and min(moved[1:]) > 0.1, moved


def test_weights_are_told_apart_from_their_float_rounding(tiny_ref_dir):
    """Another CPU's rebuild (values an ulp apart) is the recorded set; a tensor moved by
    0.1%, or another member's files, is not, and the failure says how to regenerate."""
    import torch

    case = golden.K3_CASES[0]
    named, extra = golden.file_tensors(tiny_ref_dir, golden.k3_files(case))
    recorded = golden.weights_summary(named, extra)
    up = [(k, torch.nextafter(v, torch.full_like(v, float("inf")))) for k, v in named]
    assert golden.weights_differ(recorded, golden.weights_summary(up, extra)) is None
    # A changed builder redraws or rescales whole tensors: the largest one 0.1% larger.
    largest = max(range(len(named)), key=lambda i: named[i][1].numel())
    moved = [(k, v * 1.001 if i == largest else v) for i, (k, v) in enumerate(named)]
    why = golden.weights_differ(recorded, golden.weights_summary(moved, extra))
    assert why and why.startswith("other values"), why
    _, meta = _golden(case.name)
    flash_files = golden.file_weights(tiny_ref_dir, golden.k3_files(golden.K3_CASES[2]))
    with pytest.raises(AssertionError, match="tiny set changed.*names.*record_goldens.sh"):
        assert_weights(meta, flash_files)
