"""A row's prompt and negative prompt: visible text within `limits.max_prompt_chars`."""

from __future__ import annotations

from k3batch import schema
from k3batch.rows.values import show, visible


def prompt(row) -> None:
    column, limit = row.prompt_column, row.rules.max_prompt_chars
    text = row.raw.get(column)
    if text is None:
        row.errors.append(f"{column}: missing (null)")
    elif not isinstance(text, str):
        row.errors.append(f"{column}: expected text, got {show(text)}")
        text = None
    elif not text.strip():
        row.errors.append(f"{column}: empty or whitespace only, got {show(text)}")
    elif not visible(text):
        row.errors.append(
            f"{column}: no visible characters (only control, format or space "
            f"characters), got {show(text)}"
        )
    elif len(text) > limit:
        row.errors.append(
            f"{column}: {len(text)} characters, above limits.max_prompt_chars={limit}"
        )
    row.out[schema.PROMPT] = text


def negative_prompt(row) -> None:
    limit = row.rules.max_prompt_chars
    negative = row.raw.get(schema.NEGATIVE_PROMPT)
    if negative is None:
        negative = row.rules.negative_prompt
    elif not isinstance(negative, str):
        row.errors.append(f"negative_prompt: expected text, got {show(negative)}")
        negative = None
    elif len(negative) > limit:
        row.errors.append(
            f"negative_prompt: {len(negative)} characters, above limits.max_prompt_chars={limit}"
        )
        negative = None
    row.out[schema.NEGATIVE_PROMPT] = negative if negative and negative.strip() else None
