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
def tiny_model(tiny_dir):
    from k3batch.model.kandinsky3 import Kandinsky3

    return Kandinsky3.from_pretrained(tiny_dir, dtype=FP32, device="cpu")


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


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> str:
    from k3batch.model.tiny_llm import make_tiny_llm

    return make_tiny_llm(str(tmp_path_factory.mktemp("models") / "tiny-llm"))


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict:
    """What a vLLM engine on this 2-core CPU machine needs: a 1 GiB KV cache (its default
    takes a share of all memory) and a private cache directory."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
    }


def vllm_beautify(llm_dir: str, env: dict, **sampling) -> dict:
    """A `beautify` config section for the tiny LLM on a CPU vLLM engine (Ray Data LLM).

    Half a CPU per engine: with the generation actor's half, one CPU stays free for the
    read and the light tasks on a 2-CPU Ray."""
    return {
        "enabled": True,
        "backend": "vllm",
        "model": llm_dir,
        "sampling": {"max_tokens": 64, **sampling},
        "vllm": {
            "num_gpus_per_engine": 0,
            "num_cpus_per_engine": 0.5,
            "max_model_len": 256,
            "batch_size": 4,
            "dtype": "float32",
            "engine_kwargs": {"enforce_eager": True},
            "env": env,
        },
    }
