"""A small OpenAI-compatible client for beautification: bounded rate, bounded retries.

Works against any OpenAI-compatible server (`vllm serve`, Ray Serve LLM, a hosted API), on
the chat-completions API (the server renders `prompt.CHAT_TEMPLATE`, or its own template)
or the completions API (k3batch sends `prompt.format_prompt(...)` as is). Usable outside
Ray Data: `chat_complete(...)` from plain code, `chat_complete_async(...)` from an async
server such as a Ray Serve deployment, `beautify_many(...)` for a batch.

Why not Ray's `HttpRequestProcessorConfig`: its stage raises when a request still fails
after its retries (a server down fails the whole job), it has no per-request timeout and
no per-row error column, and it sends each batch's requests one after another. Here a
failed request is that row's `beautify_error`, and requests overlap up to `max_in_flight`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from k3batch.beautify.prompt import DEFAULT_SYSTEM_PROMPT, chat_messages, format_prompt

Api = Literal["chat", "completions"]

# Worth another try: rate limits, timeouts and the server being (re)started or overloaded.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_SHOWN_CHARS = 300


class ChatError(Exception):
    """A request that failed for good. `retryable` says whether another try could help."""

    def __init__(self, message: str, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class RateLimiter:
    """Spaces request starts at least 1/qps seconds apart (qps None or <= 0: no limit).

    No lock is needed: an event loop runs one coroutine at a time and `acquire` reserves
    its slot before it awaits, so it also works across the event loops of successive
    `asyncio.run` calls.
    """

    def __init__(self, qps: float | None):
        self.interval = 1.0 / qps if qps and qps > 0 else 0.0
        self._next = 0.0

    async def acquire(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass
class Sampling:
    """Sampling parameters of a beautification request (OpenAI request-body names)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # sent as is, e.g. repetition_penalty


def request_body(
    prompt: str,
    *,
    model: str,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    api: Api = "chat",
    sampling: Sampling | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The JSON body of one chat-completions or completions request."""
    s = sampling or Sampling()
    body: dict[str, Any] = {"model": model}
    if api == "chat":
        body["messages"] = chat_messages(prompt, system_prompt)
    else:
        body["prompt"] = format_prompt(prompt, system_prompt)
    body.update(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
    if s.stop:
        body["stop"] = list(s.stop)
    if seed is not None:
        body["seed"] = seed
    body.update(s.extra)
    return body


def endpoint(base_url: str, api: Api) -> str:
    """`base_url` is the API root, e.g. http://host:8000/v1 (as for the openai package)."""
    path = "chat/completions" if api == "chat" else "completions"
    return f"{base_url.rstrip('/')}/{path}"


def _answer(data: Any, api: Api) -> str:
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise ChatError(f"unexpected response: {str(data)[:_SHOWN_CHARS]}") from None
    return text or ""  # a null content is an empty answer


async def _post_once(session, url: str, body: dict, headers: dict, timeout_s: float, api: Api):
    import aiohttp

    try:
        async with session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                text = (await resp.text())[:_SHOWN_CHARS]
                raise ChatError(
                    f"HTTP {resp.status}: {text}",
                    retryable=resp.status in RETRYABLE_STATUS,
                    status=resp.status,
                )
            data = await resp.json(content_type=None)
    except TimeoutError:
        raise ChatError(f"timed out after {timeout_s} s", retryable=True) from None
    except aiohttp.ClientError as e:
        # Connection refused or reset, server went away: the server may come back.
        raise ChatError(f"{type(e).__name__}: {e}", retryable=True) from None
    return _answer(data, api)


async def chat_complete_async(
    base_url: str,
    prompt: str,
    *,
    model: str,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    api: Api = "chat",
    sampling: Sampling | None = None,
    seed: int | None = None,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    max_retries: int = 3,
    retry_backoff_s: float = 1.0,
    rate_limiter: RateLimiter | None = None,
    session=None,
) -> str:
    """Beautify one prompt; returns the model's raw answer. Raises ChatError.

    Retries connection errors, timeouts and HTTP 408/409/429/5xx up to `max_retries` times
    with exponential backoff (retry_backoff_s * 2**attempt); other errors fail at once.
    Pass an aiohttp `session` to reuse connections, and a shared `rate_limiter` to bound
    the request rate of many calls.
    """
    import aiohttp

    url = endpoint(base_url, api)
    body = request_body(
        prompt, model=model, system_prompt=system_prompt, api=api, sampling=sampling, seed=seed
    )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    own_session = session is None
    if own_session:
        session = aiohttp.ClientSession()
    try:
        for attempt in range(max_retries + 1):
            if rate_limiter is not None:
                await rate_limiter.acquire()
            try:
                return await _post_once(session, url, body, headers, timeout_s, api)
            except ChatError as e:
                if not e.retryable or attempt == max_retries:
                    if attempt:
                        raise ChatError(
                            f"{e} (after {attempt + 1} tries)", e.retryable, e.status
                        ) from None
                    raise
            await asyncio.sleep(retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")
    finally:
        if own_session:
            await session.close()


def chat_complete(base_url: str, prompt: str, **kwargs) -> str:
    """Synchronous `chat_complete_async` (for scripts and sync code; not inside a loop)."""
    return asyncio.run(chat_complete_async(base_url, prompt, **kwargs))


async def beautify_many_async(
    base_url: str,
    prompts: Sequence[str],
    seeds: Sequence[int | None],
    *,
    max_in_flight: int = 16,
    rate_limiter: RateLimiter | None = None,
    **kwargs,
) -> list[tuple[str | None, str | None]]:
    """Beautify many prompts concurrently: one (answer, None) or (None, error) per prompt,
    in order. At most `max_in_flight` requests are open at once; one failure never fails
    the others."""
    import aiohttp

    limit = asyncio.Semaphore(max_in_flight)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt, seed):
            async with limit:
                try:
                    text = await chat_complete_async(
                        base_url,
                        prompt,
                        seed=seed,
                        session=session,
                        rate_limiter=rate_limiter,
                        **kwargs,
                    )
                except ChatError as e:
                    return None, str(e)
                except Exception as e:  # noqa: BLE001 - a bug in one row stays in that row
                    return None, f"{type(e).__name__}: {e}"
                return text, None

        return list(await asyncio.gather(*(one(p, s) for p, s in zip(prompts, seeds, strict=True))))


def beautify_many(base_url: str, prompts, seeds, **kwargs) -> list[tuple[str | None, str | None]]:
    """Synchronous `beautify_many_async`."""
    return asyncio.run(beautify_many_async(base_url, prompts, seeds, **kwargs))
