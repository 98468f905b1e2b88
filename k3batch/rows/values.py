"""Reading a row's values: numbers, text, image sources and item lists, each bad value a
`RowError` (or an error appended) naming the field and quoting the value."""

from __future__ import annotations

import math
import numbers
import unicodedata

_SHOWN_CHARS = 60


class RowError(ValueError):
    pass


def show(value) -> str:
    """A value quoted for an error message, shortened."""
    text = repr(value)
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..." + f" ({len(str(value))} chars)"
    return text


def as_int(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RowError(f"{field}: expected an integer, got {show(value)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(value) or value != int(value):
        raise RowError(f"{field}: expected an integer, got {show(value)}")
    return int(value)


def as_float(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RowError(f"{field}: expected a number, got {show(value)}")
    return float(value)


def as_text(field: str, value) -> str:
    if not isinstance(value, str):
        raise RowError(f"{field}: expected text, got {show(value)}")
    return value


def visible(text: str) -> bool:
    """Whether `text` has a character that is not a control, format, unassigned or
    separator character (Unicode categories C* and Z*): a letter, digit, mark, symbol..."""
    return any(unicodedata.category(c)[0] not in "CZ" for c in text)


def source(raw: dict, name: str, errors: list[str], where: str | None = None):
    """An image or mask column's value: a non-empty URI string or non-empty raw bytes.
    `where`: how errors name it (default `name`)."""
    value = raw.get(name)
    name = where or name
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        if not value:
            errors.append(f"{name}: empty bytes")
            return None
        return value
    if isinstance(value, str):
        if not value.strip():
            errors.append(f"{name}: empty URI, got {show(value)}")
            return None
        return value
    errors.append(f"{name}: expected a URI or raw bytes, got {show(value)}")
    return None


def items(value, name: str, shape: str, errors: list[str]):
    """(`name[j]`, item) of a non-empty list of dicts (`mix`, `ip_images`); the list's or an
    item's error, naming it, otherwise."""
    if not isinstance(value, (list, tuple)) or not value:
        errors.append(f"{name}: expected a non-empty list of {shape}, got {show(value)}")
        return
    for j, item in enumerate(value):
        if isinstance(item, dict):
            yield f"{name}[{j}]", item
        else:
            errors.append(f"{name}[{j}]: expected {shape}, got {show(item)}")


def weight(value, where: str, errors: list[str], optional: bool = False) -> None:
    """An item's `weight`: a finite number (or null when `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        errors.append(f"{where}.weight: expected a number, got {show(value)}")
    elif not math.isfinite(value):
        errors.append(f"{where}.weight: must be finite, got {show(value)}")
