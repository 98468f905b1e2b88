"""Paths and URIs through fsspec: local paths and any installed protocol (s3://, gs://, ...)."""

from __future__ import annotations

import os


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """Local paths become absolute (workers may run elsewhere); URIs stay as they are."""
    return uri if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def filesystem(uri: str):
    """(fsspec filesystem, path inside it) for a URI or local path."""
    import fsspec

    return fsspec.core.url_to_fs(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])
