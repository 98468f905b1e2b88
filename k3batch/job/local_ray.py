"""Ray start-up for a job: CPU budgeting, joining a cluster or starting a local Ray.

`k3batch run` without an address always starts a Ray of its own; any failure to join or
start is one line naming the field; a healthy start leaves no line a user must learn to
ignore (token auth, Ray Data's console chatter, one false-alarm C++ error line).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
from typing import TYPE_CHECKING

from k3batch import gpus
from k3batch.config import ConfigError, JobConfig

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind

log = logging.getLogger(__name__)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def reserved_cpus(cfg: JobConfig, kind: JobKind) -> float:
    """CPUs the job's actor pools (as its `kind` declares them) hold for the whole run, at
    their starting sizes."""
    return sum(p.actors * p.cpus_each for p in kind.pools(cfg))


def cpus_needed(cfg: JobConfig, kind: JobKind) -> int:
    """Logical CPUs the job cannot run with fewer of: its actor pools' plus one whole CPU,
    as Ray Data's list-files, read and repartition tasks ask one each. With none left those
    tasks are never scheduled and the job hangs without a word from Ray."""
    return math.ceil(reserved_cpus(cfg, kind) + 1)


# On resume Ray adds a CheckpointFilter actor pool that reserves one whole CPU (Ray 2.60
# has no setting for it); the filter mostly waits, so a resumed run counts one more.
CHECKPOINT_FILTER_CPUS = 1


def ray_address(cfg: JobConfig) -> str | None:
    """The cluster to join (ray.address, else RAY_ADDRESS); None starts a local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS")


def starts_local_ray(cfg: JobConfig) -> bool:
    """Whether `init_ray` will start a Ray of this job's own (no address, none running here)."""
    ray = sys.modules.get("ray")
    return not ray_address(cfg) and not (ray is not None and ray.is_initialized())


def check_local_cpus(cfg: JobConfig, kind: JobKind) -> None:
    local = not ray_address(cfg)
    need = cpus_needed(cfg, kind)
    if local and cfg.ray.num_cpus is not None and cfg.ray.num_cpus < need:
        raise ConfigError(
            f"ray.num_cpus: {cfg.ray.num_cpus} CPUs cannot run this job: its actor pools "
            f"reserve {reserved_cpus(cfg, kind):g} (resources.num_actors x "
            "resources.num_cpus_per_actor, plus the text encoder and beautify pools) and Ray "
            f"Data's own tasks need one more; set ray.num_cpus to {need} or more, "
            "or leave it unset"
        )


def local_num_cpus(cfg: JobConfig, kind: JobKind, resumed: bool) -> int:
    """Logical CPUs of a new local Ray instance: ray.num_cpus, else the machine's, but at
    least `cpus_needed`. A small machine then counts more CPUs than it has: the tasks that
    need the extra one are short, and the actors' threads are what keep the cores busy. A
    resumed run counts CHECKPOINT_FILTER_CPUS more.
    """
    cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, cpus_needed(cfg, kind))
    return cpus + (CHECKPOINT_FILTER_CPUS if resumed else 0)


def warn_if_cluster_short(cfg: JobConfig, kind: JobKind, resumed: bool) -> None:
    """A cluster we did not start may be too small for the job (until its autoscaler adds
    nodes): say so, since Ray Data waits without a word."""
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    need = cpus_needed(cfg, kind) + (CHECKPOINT_FILTER_CPUS if resumed else 0)
    if have < need:
        log.warning(
            "k3batch: the Ray cluster has %g CPUs and this job needs %d (actor pools %g, "
            "plus one for Ray Data's tasks%s): it will wait until the cluster grows",
            have,
            need,
            reserved_cpus(cfg, kind),
            ", plus one for resume's checkpoint filter" if resumed else "",
        )


# A join of ray.address / RAY_ADDRESS gives up after about this many seconds. Ray's own
# default retries an unreachable address 20 times at ~40 s each (about 14 minutes).
RAY_CONNECT_TIMEOUT_S = 10


def _ray_address_field(cfg: JobConfig) -> str:
    return "ray.address" if cfg.ray.address else "RAY_ADDRESS"


def _probe_address(address: str) -> str | None:
    """Why host:port (or ray://host:port) cannot be reached, or None. A closed port or a
    dead host is named at once, without Ray's retries and their log lines."""
    import socket

    match = re.fullmatch(r"(?:ray://)?\[?([^\s/\[\]]+?)\]?:(\d+)/?", address.strip())
    if not match:  # "auto" and other forms Ray resolves itself
        return None
    try:
        socket.create_connection((match[1], int(match[2])), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
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


# Ray Data hands each actor pool worker its DataContext and map transformer as object
# refs (ray/data/_internal/execution/operators/actor_pool_map_operator.py, `_MapWorker`
# `.remote(ctx=..., map_transformer=self._map_transformer_ref)`), and Ray core logs an
# error for every actor created with object-store arguments and max_restarts > 0
# (src/ray/core_worker/core_worker.cc, "has constructor arguments in the object store";
# ray-project/ray#53727, reported for Ray Data as #57733). Ray Data holds those refs for the
# operator's lifetime, so its restarts work: on every run that line is a false alarm, not
# about k3batch's constructor arguments (any actor pool gets it). The driver's C++ logger
# writes it straight to file descriptor 2, so only a filter on that descriptor can drop it.
_RAY_DATA_ACTOR_ARGS = (
    r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\([^\n]*has constructor "
    r"arguments in the object store and max_restarts > 0"
)
# The filter is a child process (it drains the pipe to the end even if the driver dies,
# so no last words are lost) copying its input through in chunks as they come (a terminal
# progress line without a newline shows at once), minus the lines that match.
_STDERR_FILTER = """
import os, re, sys
drop = re.compile(sys.argv[1].encode())
out = sys.stdout.buffer
while data := os.read(0, 1 << 16):
    if drop.search(data):
        data = b"".join(ln for ln in data.splitlines(True) if not drop.search(ln))
    out.write(data)
    out.flush()
"""
_stderr_filter = None


def _drop_ray_data_actor_args_error() -> None:
    """Route file descriptor 2 through the filter above (once per process)."""
    global _stderr_filter
    import atexit
    import subprocess

    if _stderr_filter is not None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _STDERR_FILTER, _RAY_DATA_ACTOR_ARGS],
            stdin=read,
            stdout=saved,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C stops the job, not the stream of its last lines
        )
    except OSError:  # no filter: the line shows, nothing else changes
        os.close(saved)
        return
    finally:
        os.close(read)
    os.dup2(write, 2)
    os.close(write)
    _stderr_filter = proc

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer goes: the filter prints the rest and ends
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    atexit.register(restore)


def init_ray(cfg: JobConfig, kind: JobKind, resumed: bool = False) -> None:
    """Join ray.address / RAY_ADDRESS, else start a local Ray of this job's own, sized for
    the pools of the job's `kind`. A failure to do either is one ConfigError line naming the
    field and Ray's own first line."""
    tty = sys.stderr.isatty()
    if not tty:
        # Model-loading bars (tqdm) in a log are \r-redraw noise; local workers inherit this.
        # Set before `import ray`: that imports tqdm, which reads TQDM_* when imported.
        os.environ.setdefault("TQDM_DISABLE", "1")
        # Ray wraps the "(Actor pid=N)" prefix of forwarded worker lines in ANSI colours
        # whatever the stream; in a log file those are escape-code noise.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = ray_address(cfg)
    if address:
        # Bound Ray's own retries for an address that answers but is no Ray head (or is
        # slow): one GCS connection attempt of ~10 s (plus its 5 s gRPC connect) instead
        # of 20 of ~40 s. Set before `import ray`, which reads them; set in the
        # environment, they can be raised.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(RAY_CONNECT_TIMEOUT_S))
    else:
        # Ray 2.60 turns token authentication on for a new local instance and warns so on
        # every start unless RAY_AUTH_MODE is set. The instance listens on the machine's
        # address (not only loopback), so keep the token (Ray finds or writes
        # ~/.ray/auth_token) and say so: no warning. An explicit RAY_AUTH_MODE wins. Set before
        # `import ray`: its config reads the mode at import.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray.data import DataContext

    started_here = not (ray.is_initialized() or address)
    if not ray.is_initialized():
        if address:
            where = f"{_ray_address_field(cfg)}: cannot join the Ray cluster at {address}"
            unreachable = _probe_address(address)
            if unreachable:
                raise ConfigError(f"{where}: {unreachable}")
            kwargs = {"address": address}
        else:
            where = (
                "ray: cannot start a local Ray instance "
                f"(ray.num_cpus={cfg.ray.num_cpus}, "
                f"ray.object_store_memory_mb={cfg.ray.object_store_memory_mb})"
            )
            kwargs = {
                # "local": a new instance even if the machine records one, e.g. the address
                # a crashed `ray start` left in /tmp/ray/ray_current_cluster (without an
                # address, ray.init would try to join that and fail).
                "address": "local",
                "num_cpus": local_num_cpus(cfg, kind, resumed),
                "num_gpus": cfg.ray.num_gpus,
                "object_store_memory": (cfg.ray.object_store_memory_mb or 0) * 2**20 or None,
                "include_dashboard": False,
                "_metrics_export_port": cfg.ray.metrics_export_port,
            }
        # Held only while joining: a local start spawns Ray's processes, which must not
        # inherit the holding file as their stderr (the GCS then failed to start).
        with _stderr_held() if address else contextlib.nullcontext(lambda: "") as held:
            try:
                ray.init(**kwargs, logging_level=logging.WARNING)
            except Exception as e:
                raise ConfigError(f"{where}: {_first_ray_line(e, held())}") from None
        _drop_ray_data_actor_args_error()
        _quiet_ray_data_console()
    if not started_here:
        warn_if_cluster_short(cfg, kind, resumed)
        gpus.check_cluster_gpus(cfg, kind)
    ctx = DataContext.get_current()
    # Progress bars redraw many times a second: fine on a terminal, a flood in job logs.
    ctx.enable_progress_bars = tty
    ctx.enable_operator_progress_bars = tty


def _quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (execution plan, "finished in", "Data sink finished") go to its
    log file only: k3batch's progress and summary say it for the user. And k3batch turns
    Ray Data's progress bars off on purpose (its own line replaces them), so Ray's once-only
    "Progress bars disabled" warning (ray/data/_internal/progress/__init__.py) is spent here."""
    from ray.util.debug import log_once

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(max(handler.level, logging.WARNING))
    log_once("ray_data_progress_manager_disabled")
