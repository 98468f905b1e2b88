"""API keys: read once from the environment and/or a file, checked against each request's
`Authorization: Bearer` header. No keys configured means no check."""

import hmac
import os

from fastapi import Request

from k3batch.serve.config import ServeAppConfig
from k3batch.serve.protocol import ApiError


def load_api_keys(cfg: ServeAppConfig) -> list[str]:
    keys: list[str] = []
    if cfg.auth.api_keys_env:
        keys += [
            k.strip() for k in os.environ.get(cfg.auth.api_keys_env, "").split(",") if k.strip()
        ]
    if cfg.auth.api_keys_file:
        with open(cfg.auth.api_keys_file) as f:
            keys += [line.strip() for line in f if line.strip()]
    if (cfg.auth.api_keys_env or cfg.auth.api_keys_file) and not keys:
        raise ValueError("auth is configured but no API key was found")
    return keys


def authorize(request: Request, keys: list[str]) -> None:
    """Refuse the request with 401 unless it carries one of `keys` (when there are any)."""
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    # Constant-time comparison: response timing does not reveal how much of a key matched.
    if not any(hmac.compare_digest(token, key) for key in keys):
        raise ApiError(
            401,
            "invalid or missing API key",
            type_="authentication_error",
            code="invalid_api_key",
        )
