"""Beautification pieces without an LLM engine: prompt format, prompt choice, packing, ids,
config rules, and the OpenAI client's retries and rate against a real local HTTP server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pyarrow as pa
import pytest

from k3batch.beautify import choose
from k3batch.beautify import config as bc
from k3batch.beautify.client import ChatError, RateLimiter, Sampling, chat_complete
from k3batch.beautify.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    chat_messages,
    format_prompt,
    request_seed,
)
from k3batch.config import ConfigError, load_config
from k3batch.rows.rules import RowRules
from k3batch.stages.base import apply_stage
from k3batch.stages.beautify import PromptRowsStage
from k3batch.stages.validate import ValidateStage

from .conftest import job_config

KANDINSKY_31_SYSTEM = (
    "You are a prompt engineer. Your mission is to expand prompts written by user. "
    "You should provide the best prompt for text to image generation in English."
)


def test_prompt_is_the_kandinsky_31_format_exactly():
    assert DEFAULT_SYSTEM_PROMPT == KANDINSKY_31_SYSTEM
    assert format_prompt("a red cat") == (
        f"### System: {KANDINSKY_31_SYSTEM}\n### User:\na red cat\n### Assistant:\n"
    )
    assert format_prompt("x", "Be brief.").startswith("### System: Be brief.\n### User:\nx\n")


def test_chat_template_gives_the_same_tokens_as_the_raw_prompt(tiny_llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    messages = chat_messages("a blue dog", "Be brief.")
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>" + format_prompt("a blue dog", "Be brief.")
    # A chat server tokenizes the rendering without special tokens; an engine given the raw
    # prompt adds BOS itself: both must reach the model as the same ids.
    chat_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    raw_ids = tok(format_prompt("a blue dog", "Be brief."))["input_ids"]
    assert chat_ids == raw_ids and raw_ids[0] == tok.bos_token_id


def test_request_seed_is_stable_and_differs_by_row_and_base():
    assert request_seed(0, "a") == request_seed(0, "a")
    assert len({request_seed(0, "a"), request_seed(0, "b"), request_seed(1, "a")}) == 3
    assert 0 <= request_seed(7, "x") < 2**63
    assert request_seed(None, "a") is None


@pytest.fixture(scope="module")
def t5(tiny_dir):
    return choose.load_text_tokenizer(tiny_dir)


def test_short_beautified_prompt_is_used_as_is(t5):
    assert choose.choose_prompt("a cat", " a fluffy red cat \n", None, "ok", t5) == (
        "a fluffy red cat",
        bc.FALLBACK_NONE,
    )


@pytest.mark.parametrize(
    "candidate, error, fallback",
    [
        ("", None, bc.FALLBACK_EMPTY),
        ("  \n ", None, bc.FALLBACK_EMPTY),
        (None, None, bc.FALLBACK_EMPTY),
        (None, "vllm: ValueError: too long", bc.FALLBACK_ERROR),
    ],
)
def test_empty_or_failed_beautification_falls_back_to_the_original(t5, candidate, error, fallback):
    assert choose.choose_prompt("a cat", candidate, error, "ok", t5) == ("a cat", fallback)


def test_rows_with_status_error_are_skipped(t5):
    assert choose.choose_prompt("", "text", None, "error", t5) == (None, bc.FALLBACK_SKIPPED)


def test_over_long_prompt_is_cut_to_128_encoder_tokens_or_replaced(t5):
    long = " ".join(f"a {c} cat in the rain, oil painting" for c in ["red", "blue"] * 20)
    assert choose.token_count(t5, long) > 128
    used, fallback = choose.choose_prompt("a cat", long, None, "ok", t5)
    assert fallback == bc.FALLBACK_TRUNCATED
    assert long.startswith(used) and len(used) < len(long)
    # As long as fits: the cut keeps 128 tokens (</s> included) give or take an edge merge.
    assert 124 <= choose.token_count(t5, used) <= 128
    assert choose.choose_prompt("a cat", long, None, "ok", t5, on_too_long="original") == (
        "a cat",
        bc.FALLBACK_TOO_LONG,
    )


def test_prompt_rows_stage_derives_the_same_ids_as_validation_and_checks_only_the_prompt():
    table = pa.table(
        {
            "prompt": ["a cat", "", None, "a dog"],
            "width": pa.array([63, None, None, None], pa.int64()),  # not this job's business
            "row_hash": pa.array([11, 12, 13, 14], pa.uint64()),
            "status": ["x", "y", "z", "w"],  # an input column named like an output column
        }
    )
    out = apply_stage(PromptRowsStage(), table)
    validated = apply_stage(ValidateStage(RowRules()), table)
    assert out.column("id").to_pylist() == validated.column("id").to_pylist()
    assert out.column("status").to_pylist() == ["ok", "error", "error", "ok"]
    assert out.column("error").to_pylist()[0] is None
    assert out.column("error").to_pylist()[1].startswith("prompt: empty")
    # The prompt table stays a prompt table: input columns untouched, no defaults added.
    assert out.column("width").to_pylist() == [63, None, None, None]
    assert out.column("input_status").to_pylist() == ["x", "y", "z", "w"]
    assert "seed" not in out.column_names and "row_hash" not in out.column_names


def test_rows_survive_packing_with_their_exact_types():
    from k3batch.beautify import ray_llm

    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "prompt": ["a cat", "", "a dog"],
            "status": ["ok", "error", "ok"],
            "seed": pa.array([2**64 - 1, 0, 5], pa.uint64()),
            "negative_prompt": pa.array([None, None, None], pa.string()),
            "tags": pa.array([["x"], [], None], pa.list_(pa.string())),
        }
    )
    packed = ray_llm.pack_rows(table, system_prompt="S", base_seed=3)
    assert packed.column(ray_llm.LLM_PROMPT).to_pylist() == [
        format_prompt("a cat", "S"),
        None,
        format_prompt("a dog", "S"),
    ]
    seeds = packed.column(ray_llm.LLM_SEED).to_pylist()
    assert seeds == [request_seed(3, "a"), -1, request_seed(3, "c")]
    # What the processor hands back: a text, a skipped row, an engine error.
    returned = packed.select([ray_llm.PACKED]).append_column(
        "generated_text", pa.array([" a fluffy cat \n", None, ""])
    )
    returned = returned.append_column(
        ray_llm.INFERENCE_ERROR, pa.array(["", ray_llm.SKIPPED, "ValueError: too long"])
    )
    out = ray_llm.unpack_rows(returned)
    assert out.select(table.column_names).equals(table)
    assert out.column("beautified_prompt").to_pylist() == ["a fluffy cat", None, None]
    assert out.column("beautify_error").to_pylist() == [None, None, "vllm: ValueError: too long"]


def test_beautify_config_rules(tmp_path):
    base = job_config(tmp_path, "in.parquet", "model")
    with pytest.raises(ConfigError, match="job=beautify needs beautify.enabled"):
        load_config(data={**base, "job": "beautify"})
    with pytest.raises(ConfigError, match="cannot be combined with beautify.enabled"):
        load_config(
            data={
                **base,
                "input": {"uri": "in.parquet", "beautified_prompt_column": "beautified_prompt"},
                "beautify": {"enabled": True},
            }
        )
    with pytest.raises(ConfigError, match="beautify.sampling.top_p"):
        load_config(data={**base, "beautify": {"sampling": {"top_p": 0}}})
    cfg = load_config(data=base)
    assert not cfg.beautify.enabled and cfg.beautify.model == "Intel/neural-chat-7b-v3-1"
    assert cfg.beautify.vllm.enable_prefix_caching and cfg.beautify.sampling.seed == 0


def test_missing_beautified_prompt_column_fails_at_start(tmp_path, tiny_dir):
    import pyarrow.parquet as pq

    from k3batch.job import kinds
    from k3batch.job.preflight import preflight

    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "in.parquet")
    data = job_config(tmp_path, str(tmp_path / "in.parquet"), tiny_dir)
    data["input"]["beautified_prompt_column"] = "beautified_prompt"
    with pytest.raises(ConfigError, match="'beautified_prompt' is not in the input table"):
        cfg = load_config(data=data)
        preflight(cfg, kinds.get(cfg.job))


# --- the OpenAI-compatible client against a real local HTTP server --------------------


class ScriptedServer:
    """A real aiohttp server on a loopback port answering /v1/chat/completions with
    scripted status codes, recording each request body."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.bodies = []
        self.times = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def _handle(self, request):
        from aiohttp import web

        self.bodies.append(await request.json())
        self.times.append(time.monotonic())
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.Response(status=status, text=f"scripted {status}")
        return web.json_response({"choices": [{"message": {"content": " an answer "}}]})

    def _serve(self):
        from aiohttp import web

        async def start():
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self.ready.set()

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_client_retries_retryable_errors_then_succeeds():
    server = ScriptedServer([503, 429])
    with server as url:
        text = chat_complete(
            url,
            "a cat",
            model="m",
            seed=42,
            sampling=Sampling(max_tokens=8, stop=["###"], extra={"repetition_penalty": 1.1}),
            retry_backoff_s=0.01,
        )
    assert text == " an answer " and len(server.bodies) == 3
    assert server.bodies[0] == server.bodies[2]  # a retry resends the same request
    assert server.bodies[0]["stop"] == ["###"] and server.bodies[0]["repetition_penalty"] == 1.1


def test_client_request_body_and_non_retryable_error():
    server = ScriptedServer([400])
    with server as url:
        with pytest.raises(ChatError, match="HTTP 400: scripted 400") as info:
            chat_complete(url, "a cat", model="m", retry_backoff_s=0.01)
        assert not info.value.retryable and len(server.bodies) == 1
        chat_complete(url, "a cat", model="m", seed=7, sampling=Sampling(extra={"min_tokens": 2}))
    body = server.bodies[-1]
    assert body["messages"] == chat_messages("a cat")
    assert body["seed"] == 7 and body["min_tokens"] == 2 and body["model"] == "m"
    assert body["max_tokens"] == 128 and body["temperature"] == 0.7 and body["top_p"] == 0.9


def test_client_gives_up_on_a_closed_port_after_its_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ChatError, match=r"after 3 tries") as info:
        chat_complete(
            f"http://127.0.0.1:{port}/v1", "a cat", model="m", max_retries=2, retry_backoff_s=0.05
        )
    assert info.value.retryable
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff 0.05 then 0.1


def test_rate_limiter_spaces_requests():
    from k3batch.beautify.client import beautify_many

    server = ScriptedServer([])
    with server as url:
        results = beautify_many(
            url,
            ["a", "b", "c", "d", "e", "f"],
            [1, 2, 3, 4, 5, 6],
            model="m",
            max_in_flight=6,
            rate_limiter=RateLimiter(qps=20),
        )
    assert results == [(" an answer ", None)] * 6
    gaps = [b - a for a, b in zip(server.times, server.times[1:], strict=False)]
    assert server.times[-1] - server.times[0] >= 5 * 0.05 * 0.9 and min(gaps) > 0.03
