"""The one place storage settings live: URIs -> fsspec and pyarrow filesystems.

Every input and output URI goes through here: local paths, s3:// (s3fs, with the config's
endpoint, region and profile) and any other fsspec protocol the user has installed, with
`storage.options` passed on. The settings are a plain dict (a `StorageConfig` dump) so they
travel in stage constructor kwargs to every Ray worker; they never hold secrets, which each
process reads from its own environment or the named profile.
"""

from __future__ import annotations

import os
from typing import Any

Settings = dict[str, Any]


class StorageError(OSError):
    """Output storage failed after its retries: the job stops (a rerun resumes) rather than
    mark rows whose only fault is the store as errors, which a rerun would never redo."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """Local paths become absolute (workers may run elsewhere); URIs stay as they are."""
    return uri if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if is_remote(uri) else "file"


def storage_options(uri: str, settings: Settings | None = None) -> dict[str, Any]:
    """fsspec storage options for `uri` from the config's `storage` section."""
    settings = settings or {}
    options: dict[str, Any] = {}
    if protocol(uri) in ("s3", "s3a"):
        # Ray workers write through their own filesystem instances: a cached listing here
        # would miss their files (resume, accounting).
        options["use_listings_cache"] = False
        if settings.get("endpoint_url"):
            options["endpoint_url"] = settings["endpoint_url"]
        if settings.get("region"):
            options.setdefault("client_kwargs", {})["region_name"] = settings["region"]
        if settings.get("profile"):
            options["profile"] = settings["profile"]
        if settings.get("anonymous"):
            options["anon"] = True
        options["config_kwargs"] = botocore_config(settings)
    if is_remote(uri):
        extra = dict(settings.get("options") or {})
        if "config_kwargs" in extra and "config_kwargs" in options:
            # The user's botocore settings refine the retry defaults rather than drop them.
            extra["config_kwargs"] = {**options["config_kwargs"], **extra["config_kwargs"]}
        options.update(extra)
    return options


def botocore_config(settings: Settings) -> dict[str, Any]:
    """botocore `Config` arguments for s3fs: retries with backoff and connection timeouts.

    Retrying here, under s3fs, covers every s3:// reader and writer alike (k3batch's own and
    Ray Data's, which reach S3 through the same s3fs filesystem). Ray Data's own write
    retries (`DataContext.retried_io_errors`) match only pyarrow's native S3 error texts, so
    they never fire for an fsspec filesystem.
    """
    return {
        # `total_max_attempts` counts the first try; botocore's `max_attempts` would not.
        "retries": {
            "total_max_attempts": int(settings.get("max_attempts") or 10),
            "mode": settings.get("retry_mode") or "standard",
        },
        "connect_timeout": settings.get("connect_timeout_s") or 10.0,
        "read_timeout": settings.get("read_timeout_s") or 60.0,
    }


def filesystem(uri: str, settings: Settings | None = None):
    """(fsspec filesystem, path inside it) for a URI or local path."""
    import fsspec

    return fsspec.core.url_to_fs(uri, **storage_options(uri, settings))


def arrow_filesystem(uri: str, settings: Settings | None = None):
    """(pyarrow filesystem, path inside it), for Ray's readers, writers and checkpoints.

    Local paths get pyarrow's own LocalFileSystem (Ray's checkpointing tells local from
    object storage by that type); remote ones wrap the same fsspec filesystem as
    `filesystem()`, so a profile or any fsspec protocol works there too.
    """
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), absolute(uri)
    fs, path = filesystem(uri, settings)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def list_files(fs, root: str, suffix: str = "") -> list[str]:
    """Files under `root` ending in `suffix`, sorted; none when root does not exist.

    Skips 0-byte "dir/" markers that some S3 writers leave.
    """
    if not fs.exists(root):
        return []
    return sorted(f for f in fs.find(root) if f.endswith(suffix) and not f.endswith("/"))


def unavailable(error: BaseException) -> bool:
    """Whether `error` says the store could not serve a request (connection refused or
    reset, timeouts, throttling, 5xx), as botocore, aiohttp, s3fs or the OS raise it."""
    import builtins
    import errno

    names = {c.__name__ for c in type(error).__mro__}
    if names & {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
    }:
        return True
    if isinstance(error, (builtins.ConnectionError, TimeoutError)):
        return True
    # s3fs turns S3's 5xx answers (InternalError, ServiceUnavailable, SlowDown) into
    # OSError(EREMOTEIO) or OSError(EBUSY).
    return isinstance(error, OSError) and error.errno in (errno.EREMOTEIO, errno.EBUSY)
