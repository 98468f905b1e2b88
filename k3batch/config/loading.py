"""Loading a job config: YAML plus `a.b=value` overrides, validated, errors in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from k3batch.config.base import ConfigError
from k3batch.config.io import SecretInValue
from k3batch.config.job import JobConfig


def set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    return out


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        hidden = isinstance((e.get("ctx") or {}).get("error"), SecretInValue)
        shown = (
            ""
            if hidden or isinstance(value, dict) or e["type"] == "missing"
            else f" (got {value!r})"
        )
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}")
    return "; ".join(parts)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None
) -> JobConfig:
    """Read YAML, apply `--set key.path=value` overrides, validate. Raises ConfigError."""
    if data is None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        set_path(data, key, value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"config error: {format_validation_error(e)}") from None
