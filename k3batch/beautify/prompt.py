"""The Kandinsky 3.1 beautification prompt, exactly as the reference README gives it.

    ### System: <system prompt>
    ### User:
    <prompt>
    ### Assistant:
    <answer of the model>

`format_prompt` builds the text a raw-completion engine reads; `CHAT_TEMPLATE` renders
`chat_messages(...)` to the same text (after the BOS token) for chat-completions servers,
so both paths feed the model the same tokens.
"""

from __future__ import annotations

import hashlib

DEFAULT_MODEL = "Intel/neural-chat-7b-v3-1"
DEFAULT_SYSTEM_PROMPT = (
    "You are a prompt engineer. Your mission is to expand prompts written by user. "
    "You should provide the best prompt for text to image generation in English."
)

# Jinja chat template (Hugging Face / vLLM `--chat-template`). The BOS token is part of the
# template because chat servers tokenize the rendered text without adding special tokens,
# while raw prompts get BOS from the tokenizer: both then see `<s>### System: ...`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System: {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}"
    "{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def format_prompt(prompt: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The LLM input for one user prompt (without BOS: the tokenizer adds it)."""
    return f"### System: {system_prompt}\n### User:\n{prompt}\n### Assistant:\n"


def chat_messages(prompt: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """The same request as OpenAI-style chat messages (rendered by `CHAT_TEMPLATE`)."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": prompt},
    ]


def clean_output(text: str | None) -> str | None:
    """The model's answer as a prompt: surrounding whitespace removed; None stays None."""
    return None if text is None else text.strip()


def request_seed(base_seed: int | None, row_id: str) -> int | None:
    """A per-request sampling seed from a base seed and the row id: reruns give the same
    text, and a row's text does not depend on its batch-mates. None: unseeded."""
    if base_seed is None:
        return None
    digest = hashlib.blake2b(f"beautify/{base_seed}/{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: vLLM and JSON clients take int64
