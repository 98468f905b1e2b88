"""Shared fixtures: tiny models built offline, one local Ray instance per test session."""

from __future__ import annotations

import os

import pytest

# Local Ray for tests: no token auth prompt, no progress-bar redraws, a stalled pipeline fails.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FP32 = {"unet": "float32", "text_encoder": "float32", "movq": "float32"}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    from k3batch.model.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("models") / "tiny-k3"))


@pytest.fixture(scope="session")
def tiny_dir_no_null(tmp_path_factory) -> str:
    from k3batch.model.tiny import make_tiny

    return make_tiny(
        str(tmp_path_factory.mktemp("models") / "tiny-k3-nonull"), null_embedding=False
    )


@pytest.fixture(scope="session")
def tiny_ref_dir(tmp_path_factory) -> str:
    """The same tiny family in the reference layout (weights/*.pt, flan_ul2_encoder/)."""
    from k3batch.model.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("models") / "tiny-k3-ref"), layout="reference")


def load_tiny(path, member="kandinsky3", **kwargs):
    from k3batch.model.kandinsky3 import Kandinsky3

    kwargs.setdefault("dtype", FP32)
    return Kandinsky3.from_pretrained(path, member=member, device="cpu", **kwargs)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_tiny(tiny_dir)


# Batch invariance. Each row has its own generator, so a row's noise never depends on its
# batch. The arithmetic can: CPU convolution and matrix kernels pick different blockings for
# different batch shapes, so latents agree to float32 rounding (~1e-6), and an image byte
# that sits on a rounding boundary can flip by one grey level.
LATENT_ATOL = 1e-4


def assert_same_images(a, b, max_flips=8):
    import numpy as np

    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        diff = np.abs(x.astype(int) - y.astype(int))
        assert diff.max() <= 1 and int((diff > 0).sum()) <= max_flips, (
            diff.max(),
            (diff > 0).sum(),
        )


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    # A short private temp dir: Ray's socket paths must stay under 107 characters.
    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=2,
        object_store_memory=300 * 2**20,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


def job_config(tmp_path, input_uri: str, model_dir: str, **sections):
    """A small job config on the tiny model, as a dict (tests tweak it before validating)."""
    cfg = {
        "input": {"uri": input_uri},
        "model": {"path": model_dir, "dtype": FP32, "device": "cpu"},
        "generation": {"num_inference_steps": 3, "width": 64, "height": 64, "seed": 0},
        "resources": {"batch_size": 4, "num_cpus_per_actor": 0.5, "write_num_cpus": 0.25},
        "output": {"uri": str(tmp_path / "out")},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
