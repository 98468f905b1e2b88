"""Shared helpers for the benchmarks: prompt tables, a tiny model, a quiet local Ray."""

from __future__ import annotations

import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

FP32 = {"unet": "float32", "text_encoder": "float32", "movq": "float32"}
WORDS = [
    "red",
    "blue",
    "golden",
    "misty",
    "cat",
    "owl",
    "castle",
    "robot",
    "forest",
    "river",
    "city",
    "night",
    "dawn",
    "storm",
]


def prompt_table(path: str, n: int) -> str:
    prompts = [
        f"a {WORDS[i % 14]} {WORDS[(i * 7 + 3) % 14]} in the {WORDS[(i * 5 + 1) % 14]}"
        for i in range(n)
    ]
    pq.write_table(pa.table({"prompt": prompts}), path)
    return path


def tiny_model_dir(size: str = "tiny") -> str:
    """The seeded random checkpoint: `tiny` (tests' model) or `bench` (see tiny.BENCH_UNET)."""
    from k3batch.testing.tiny import make_tiny

    return make_tiny(os.path.join(tempfile.gettempdir(), f"k3batch-bench-{size}"), size=size)


def job(
    input_uri: str,
    output_uri: str,
    model_dir: str,
    *,
    size: int,
    steps: int,
    batch_size: int,
    **resources,
):
    from k3batch.config import load_config

    return load_config(
        data={
            "input": {"uri": input_uri},
            "model": {"path": model_dir, "dtype": FP32, "device": "cpu"},
            "generation": {"num_inference_steps": steps, "width": size, "height": size},
            "resources": {"batch_size": batch_size, **resources},
            "output": {"uri": output_uri, "overwrite": True},
        }
    )
