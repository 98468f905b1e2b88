"""Beautification stages: ids for a prompt-only table, the OpenAI-compatible client, and the
choice of the prompt that generation uses. (The vLLM backend runs on Ray Data LLM:
`k3batch.beautify.ray_llm`.)"""

from __future__ import annotations

import os

import pyarrow as pa

from k3batch import schema
from k3batch.beautify import choose
from k3batch.beautify.config import SamplingConfig
from k3batch.beautify.prompt import clean_output, request_seed
from k3batch.rows.rules import RowRules
from k3batch.stages.base import Stage
from k3batch.stages.validate import ValidateStage


class PromptRowsStage(Stage):
    """For the beautify-only job: the row's `id` (derived exactly as the text-to-image job
    derives it) and a `status`/`error` for a missing or empty prompt. Every other input
    column, the prompt included, passes through untouched: the output is still a prompt
    table, without the generation defaults a ValidateStage would fill in."""

    adds = schema.types(schema.ID, schema.STATUS, schema.ERROR)
    drops = (schema.ROW_HASH,)

    def __init__(
        self,
        prompt_column: str = schema.PROMPT,
        id_column: str = schema.ID,
        max_chars: int = 20000,
    ):
        self.validate = ValidateStage(
            RowRules(max_prompt_chars=max_chars), prompt_column, id_column
        )
        self.prompt_column = prompt_column
        self.needs = (prompt_column,)
        self.optional = (id_column, schema.ROW_HASH)

    def prepare(self, table: pa.Table) -> pa.Table:
        return self.validate.prepare(table)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        checked = self.validate(batch)
        prefixes = (f"{self.prompt_column}:", f"{self.validate.id_column}:")
        out = {schema.ID: checked[schema.ID], schema.STATUS: [], schema.ERROR: []}
        for error in checked[schema.ERROR]:
            # Only the prompt and the id matter here; size or seed columns are not ours.
            mine = [e for e in (error or "").split("; ") if e.startswith(prefixes)]
            out[schema.STATUS].append(schema.STATUS_ERROR if mine else schema.STATUS_OK)
            out[schema.ERROR].append("; ".join(mine) or None)
        return out


class OpenAIBeautifyStage(Stage):
    """Beautify through an OpenAI-compatible server; a failed request is that row's error."""

    adds = schema.types(schema.BEAUTIFIED_PROMPT, schema.BEAUTIFY_ERROR)

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        system_prompt: str,
        sampling: SamplingConfig,
        api: str = "chat",
        api_key_env: str | None = None,
        qps: float | None = None,
        max_in_flight: int = 16,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        prompt_column: str = schema.PROMPT,
    ):
        from k3batch.beautify.client import RateLimiter, Sampling

        self.prompt_column = prompt_column
        self.needs = (schema.ID, prompt_column, schema.STATUS)
        self.base_seed = sampling.seed
        self.kwargs = dict(
            model=model,
            system_prompt=system_prompt,
            api=api,
            sampling=Sampling(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop),
                extra=dict(sampling.extra),
            ),
            api_key=os.environ.get(api_key_env) if api_key_env else None,
            timeout_s=timeout_s,
            max_retries=max_retries,
            retry_backoff_s=retry_backoff_s,
        )
        self.base_url = base_url
        self.max_in_flight = max_in_flight
        # One limiter per actor for its whole life: the job's rate is qps x actors.
        self.rate_limiter = RateLimiter(qps)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        from k3batch.beautify.client import beautify_many

        n = len(batch[schema.ID])
        out = {schema.BEAUTIFIED_PROMPT: [None] * n, schema.BEAUTIFY_ERROR: [None] * n}
        todo = [
            i
            for i in range(n)
            if choose.wants_beautify(batch[self.prompt_column][i], batch[schema.STATUS][i])
        ]
        if not todo:
            return out
        results = beautify_many(
            self.base_url,
            [batch[self.prompt_column][i] for i in todo],
            [request_seed(self.base_seed, batch[schema.ID][i]) for i in todo],
            max_in_flight=self.max_in_flight,
            rate_limiter=self.rate_limiter,
            **self.kwargs,
        )
        for i, (text, error) in zip(todo, results, strict=True):
            out[schema.BEAUTIFIED_PROMPT][i] = clean_output(text)
            out[schema.BEAUTIFY_ERROR][i] = f"openai: {error}" if error else None
        return out


class ChoosePromptStage(Stage):
    """`prompt_used` (what generation reads) and `beautify_fallback` (why) for each row."""

    adds = schema.types(schema.PROMPT_USED, schema.BEAUTIFY_FALLBACK)

    def __init__(
        self,
        model_path: str,
        candidate_column: str = schema.BEAUTIFIED_PROMPT,
        on_too_long: str = "truncate",
        max_tokens: int = choose.TEXT_ENCODER_TOKENS,
    ):
        """`model_path`: the folder whose tokenizer/ the diffusion model reads prompts with;
        `max_tokens`: that text encoder's context (the member's `max_prompt_tokens`)."""
        self.tokenizer = choose.load_text_tokenizer(model_path)
        self.max_tokens = max_tokens
        self.candidate_column = candidate_column
        self.on_too_long = on_too_long
        self.needs = (schema.PROMPT, schema.STATUS, candidate_column)
        self.optional = (schema.BEAUTIFY_ERROR,)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch[schema.PROMPT])
        errors = batch.get(schema.BEAUTIFY_ERROR) or [None] * n
        out = {schema.PROMPT_USED: [], schema.BEAUTIFY_FALLBACK: []}
        for i in range(n):
            candidate = batch[self.candidate_column][i]
            used, fallback = choose.choose_prompt(
                batch[schema.PROMPT][i],
                candidate if isinstance(candidate, str) else None,
                errors[i],
                batch[schema.STATUS][i],
                self.tokenizer,
                self.on_too_long,
                self.max_tokens,
            )
            out[schema.PROMPT_USED].append(used)
            out[schema.BEAUTIFY_FALLBACK].append(fallback)
        return out
