"""Where Ray comes from: a fresh local instance, or the cluster at an address, joined or
refused within seconds with one line.

`target` resolves the address a command was given; `start_ray` joins or starts; `jobs_client`
is `k3batch submit`'s Ray Jobs API client under the same rule. A failure is a ConfigError
naming the field the address came from (`ray.address`, `--address`, `RAY_ADDRESS`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass

from k3batch.config import ConfigError

log = logging.getLogger(__name__)

# A join gives up after about this many seconds. Ray's own default retries an unreachable
# address 20 times at ~40 s each (about 14 minutes), and a stale `ray_current_cluster` made
# `ray.init()` without an address retry for ever.
RAY_CONNECT_TIMEOUT_S = 10


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass(frozen=True)
class Target:
    """The Ray a command runs on: `address` None is a fresh local Ray; `field` names where
    the address came from (for error lines)."""

    address: str | None
    field: str = ""

    @property
    def local(self) -> bool:
        return not self.address


def target(address: str | None, field: str, env: tuple[str, ...] = ("RAY_ADDRESS",)) -> Target:
    """The command's own address (named `field`), else the first of the `env` variables that
    is set, else a fresh local Ray."""
    if address:
        return Target(address, field)
    for name in env:
        if os.environ.get(name):
            return Target(os.environ[name], name)
    return Target(None)


def quiet_console() -> None:
    """A log gets no redraws: when stderr is not a terminal, tqdm bars (model loading, and
    the tiny sets' "Writing model shards" at pre-flight) are off. Call before anything
    imports tqdm (transformers, huggingface_hub, ray): tqdm reads TQDM_* when imported.
    Set with setdefault, so a value in the environment wins; local workers inherit them."""
    if not sys.stderr.isatty():
        # Model-loading bars (tqdm) in a log are \r-redraw noise. `import ray` imports
        # tqdm, which reads TQDM_* when imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
        # Ray wraps the "(Actor pid=N)" prefix of forwarded worker lines in ANSI colours
        # whatever the stream; in a log file those are escape-code noise.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def set_environment(where: Target) -> None:
    """Environment defaults Ray reads when `ray` is imported: call before `import ray`.
    Set with setdefault, so a value in the environment wins; local workers inherit them."""
    quiet_console()
    if where.address:
        # Bound Ray's own retries for an address that answers but is no Ray head (or is
        # slow): one GCS connection attempt of ~10 s (plus its 5 s gRPC connect) instead
        # of 20 of ~40 s.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(RAY_CONNECT_TIMEOUT_S))
    else:
        # Ray 2.60 turns token authentication on for a new local instance and warns so on
        # every start unless RAY_AUTH_MODE is set. The instance listens on the machine's
        # address (not only loopback), so keep the token (Ray finds or writes
        # ~/.ray/auth_token) and say so: no warning.
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _recorded() -> str | None:
    """The address `auto` stands for: the cluster the last `ray start` here recorded, else a
    Ray running on this machine (Ray's own lookup, a private API: without it, None)."""
    quiet = logging.getLogger("ray._private.services")  # its "multiple instances" warning
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from ray._private import services

        return services.canonicalize_bootstrap_address("auto")
    except Exception as e:  # noqa: BLE001 - nothing recorded: Ray's own error says so
        log.debug("could not resolve address auto: %s", e)
        return None
    finally:
        quiet.setLevel(level)


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of `host:port`, `ray://host:port` or `http(s)://host[:port]`; None for
    forms Ray resolves itself."""
    match = re.fullmatch(r"(?:(ray|https?)://)?\[?([^\s/\[\]]+?)\]?(?::(\d+))?/?", address.strip())
    if not match or (match[3] is None and match[1] not in ("http", "https")):
        return None
    port = int(match[3]) if match[3] else (443 if match[1] == "https" else 80)
    return match[2], port


def unreachable(address: str) -> str | None:
    """Why the address cannot be reached, or None. A closed port or a dead host is named at
    once, without Ray's retries and their log lines."""
    import socket

    recorded = _recorded() if address.strip() == "auto" else None
    host_port = _host_port(recorded or address)
    if host_port is None:
        return None
    try:
        socket.create_connection(host_port, timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = f"{type(e).__name__}: {e}"
        return f"{why} (auto is {recorded} here)" if recorded else why
    return None


@contextlib.contextmanager
def _stderr_held():
    """Hold what the process writes to file descriptor 2 (Ray's C++ logs included) while
    Ray starts: printed as it came if the start succeeds, dropped if it fails (the error is
    then one line). Yields a function returning the held text."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)

        def text() -> str:
            sys.stderr.flush()
            held.seek(0)
            return held.read().decode(errors="replace")

        ok = False
        try:
            yield text
            ok = True
        finally:
            written = text()
            os.dup2(saved, 2)
            os.close(saved)
            if ok and written:
                sys.stderr.write(written)
                sys.stderr.flush()


def _first_ray_line(e: BaseException, held: str) -> str:
    """Ray's own first line for a failed start: the exception's, else its last logged error."""
    causes = [e, *(c for c in (e.__cause__, e.__context__) if c is not None)]
    line = first_line(e)
    for c in causes:
        text = str(c).strip()
        if text and "Traceback" not in text.splitlines()[0]:
            line = first_line(c)
            break
    logged = [ln for ln in held.splitlines() if re.search(r" [EFC] \d+ \d+\]|ERROR", ln)]
    if logged and len(line) < 60:
        line += f" ({logged[-1].strip()})"
    return line


def start_ray(where: Target, local: dict, local_what: str) -> str:
    """Join `where.address`, else start a fresh local Ray with `ray.init` options `local`
    (`local_what`: the error line's start, naming the settings). Returns `running` (this
    process had Ray already), `joined` or `started`. A failure to join or start is one
    ConfigError line: the field, the address and Ray's own first line."""
    set_environment(where)
    import ray

    if ray.is_initialized():
        return "running"
    if where.address:
        failed = f"{where.field}: cannot join the Ray cluster at {where.address}"
        why = unreachable(where.address)
        if why:
            raise ConfigError(f"{failed}: {why}")
        kwargs = {"address": where.address}
    else:
        failed = local_what
        # "local": a new instance even if the machine records one, e.g. the address a
        # crashed `ray start` left in /tmp/ray/ray_current_cluster (without an address,
        # ray.init would try to join that and retry for ever).
        kwargs = {"address": "local", **local}
    # Held only while joining: a local start spawns Ray's processes, which must not inherit
    # the holding file as their stderr (the GCS then failed to start).
    with _stderr_held() if where.address else contextlib.nullcontext(lambda: "") as held:
        try:
            ray.init(**kwargs, logging_level=logging.WARNING)
        except Exception as e:
            raise ConfigError(f"{failed}: {_first_ray_line(e, held())}") from None
    return "joined" if where.address else "started"


def jobs_client(where: Target):
    """A Ray Jobs API client for the dashboard at `where.address` (`k3batch submit`), or one
    ConfigError line within seconds. The client's own requests have no time limit, so a
    port that takes connections but never answers is asked once here with one."""
    failed = f"{where.field}: cannot reach the Ray Jobs API at {where.address}"
    why = unreachable(where.address)
    if why:
        raise ConfigError(f"{failed}: {why}")
    set_environment(where)
    import requests
    from ray.job_submission import JobSubmissionClient

    if re.match(r"https?://", where.address):
        try:  # any HTTP answer will do: the client checks the version (and auth) itself
            requests.get(f"{where.address.rstrip('/')}/api/version", timeout=RAY_CONNECT_TIMEOUT_S)
        except requests.RequestException as e:
            raise ConfigError(f"{failed}: {first_line(e)}") from None
    try:
        return JobSubmissionClient(where.address)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError
        raise ConfigError(f"{failed}: {first_line(e)}") from None
