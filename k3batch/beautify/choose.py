"""Which prompt a row is generated from: the beautified one, cut to fit, or the original."""

from __future__ import annotations

import functools

from k3batch.beautify import config as bc
from k3batch.schema import STATUS_OK

TEXT_ENCODER_TOKENS = 128  # Kandinsky 3 tokenizes to 128 tokens, </s> included


def tokenizer_path(model) -> str:
    """The folder whose tokenizer/ the member (a `ModelConfig`) reads prompts with: the
    checkpoint for Kandinsky 3, the prior for Kandinsky 2.2."""
    from k3batch.model import family

    return family.of(model.name).tokenizer_path(model)


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(model_path: str):
    """The diffusion model's tokenizer (tokenizer/ of a diffusers-layout checkpoint: T5 for
    Kandinsky 3, CLIP in Kandinsky 2.2's prior folder).

    Cached per process: stages that run as Ray tasks reuse the worker's copy.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer")


def wants_beautify(prompt, status) -> bool:
    """Rows worth an LLM request: valid rows with a non-blank prompt."""
    return status == STATUS_OK and isinstance(prompt, str) and bool(prompt.strip())


def token_count(tokenizer, text: str) -> int:
    """Tokens the text encoder would read, special tokens included, without truncation."""
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_to_encoder(tokenizer, text: str, max_tokens: int = TEXT_ENCODER_TOKENS) -> str:
    """`text` cut at a token boundary so that it tokenizes to at most `max_tokens` tokens.

    Cuts the string (via the tokenizer's character offsets) rather than decoding tokens,
    so the kept part is the model's own text, not a re-normalised copy.
    """
    if token_count(tokenizer, text) <= max_tokens:
        return text
    specials = token_count(tokenizer, "")  # e.g. 1 for T5's </s>
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    keep = max_tokens - specials
    while keep > 0:
        cut = text[: offsets[keep - 1][1]].rstrip()
        # Re-tokenising a cut string can merge differently at the edge: check, shrink.
        if token_count(tokenizer, cut) <= max_tokens:
            return cut
        keep -= 1
    return ""


def choose_prompt(
    original: str | None,
    candidate: str | None,
    error: str | None,
    status: str,
    tokenizer,
    on_too_long: str = "truncate",
    max_tokens: int = TEXT_ENCODER_TOKENS,
) -> tuple[str | None, str]:
    """(prompt_used, beautify_fallback) for one row; see `config.FALLBACK_*`. `max_tokens`:
    the member's text encoder context (`Member.max_prompt_tokens`: T5's 128, CLIP's 77)."""
    if status != STATUS_OK:
        return None, bc.FALLBACK_SKIPPED
    text = candidate.strip() if isinstance(candidate, str) else ""
    if not text:
        return original, bc.FALLBACK_ERROR if error else bc.FALLBACK_EMPTY
    if token_count(tokenizer, text) <= max_tokens:
        return text, bc.FALLBACK_NONE
    if on_too_long == "original":
        return original, bc.FALLBACK_TOO_LONG
    cut = fit_to_encoder(tokenizer, text, max_tokens)
    if not cut:
        return original, bc.FALLBACK_EMPTY
    return cut, bc.FALLBACK_TRUNCATED
