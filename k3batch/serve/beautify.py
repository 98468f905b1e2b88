"""Online prompt beautification: one request's prompt through an OpenAI-compatible LLM server,
with the batch job's rules (Kandinsky 3.1 prompt format, fit to the text encoder's 128 tokens).

`OnlineBeautifier` is plain asyncio code, usable and testable without Serve; the Serve app
wraps it in the `Beautifier` deployment so the LLM client scales apart from the generators.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from k3batch.beautify import choose
from k3batch.beautify import config as bc
from k3batch.beautify.client import ChatError, Sampling, chat_complete_async
from k3batch.beautify.prompt import clean_output
from k3batch.schema import STATUS_OK
from k3batch.serve.config import ServeBeautifyConfig


@dataclass
class Beautified:
    """What beautify did for a request: the prompt to generate from, and why."""

    prompt_used: str
    revised_prompt: str | None  # None when the original prompt is used
    fallback: str  # one of k3batch.beautify.config.FALLBACK_*
    error: str | None = None


class OnlineBeautifier:
    def __init__(
        self,
        cfg: ServeBeautifyConfig,
        tokenizer_path: str,
        max_tokens: int = choose.TEXT_ENCODER_TOKENS,
    ):
        """`tokenizer_path`: the folder whose tokenizer/ the member reads prompts with;
        `max_tokens`: its text encoder's context (T5's 128, Kandinsky 2.2's CLIP 77)."""
        self.cfg = cfg
        # The diffusion model's own tokenizer decides what fits its context.
        self.tokenizer = choose.load_text_tokenizer(tokenizer_path)
        self.max_tokens = max_tokens
        s = cfg.sampling
        self.sampling = Sampling(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=list(s.stop),
            extra=dict(s.extra),
        )
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._session = None

    async def _http(self):
        import aiohttp

        # One pooled session per replica, made inside the serving event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def beautify(self, prompt: str, seed: int | None) -> Beautified:
        cfg = self.cfg
        # The request's seed (if any) seeds the LLM: the same request, the same revision.
        llm_seed = None if seed is None else seed % 2**63
        try:
            text = await chat_complete_async(
                cfg.base_url,
                prompt,
                model=cfg.model,
                system_prompt=cfg.system_prompt,
                api=cfg.api,
                sampling=self.sampling,
                seed=llm_seed,
                api_key=self.api_key,
                timeout_s=cfg.timeout_s,
                max_retries=cfg.max_retries,
                retry_backoff_s=cfg.retry_backoff_s,
                session=await self._http(),
            )
            error = None
        except ChatError as e:
            text, error = None, str(e)
        used, fallback = choose.choose_prompt(
            prompt,
            clean_output(text),
            error,
            STATUS_OK,
            self.tokenizer,
            cfg.on_too_long,
            self.max_tokens,
        )
        revised = used if fallback in (bc.FALLBACK_NONE, bc.FALLBACK_TRUNCATED) else None
        return Beautified(prompt_used=used, revised_prompt=revised, fallback=fallback, error=error)
