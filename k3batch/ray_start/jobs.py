"""Ray for a batch job (`k3batch run`): the start-up rule of `connect` with the job's CPU
budget, the budget checks on a cluster it joined, and Ray Data's console.

A healthy start leaves no line a user must learn to ignore (token auth, Ray Data's console
chatter, one false-alarm C++ error line).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from k3batch import gpus
from k3batch.config import JobConfig
from k3batch.ray_start import budget
from k3batch.ray_start.connect import set_environment, start_ray

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind


def init_ray(cfg: JobConfig, kind: JobKind, resumed: bool = False, work: bool = True) -> None:
    """Join ray.address / RAY_ADDRESS, else start a local Ray of this job's own, sized for
    the pools of the job's `kind`. A failure to do either is one ConfigError line naming the
    field and Ray's own first line. `work`: the job has rows to make, so a Ray it did not
    start is checked for the CPUs and GPUs its pools ask (`check_cluster`); a rerun with
    nothing left asks for none."""
    where = budget.job_target(cfg)
    set_environment(where)  # before the first `import ray`
    from ray.data import DataContext

    state = start_ray(
        where,
        local={
            "num_cpus": budget.local_num_cpus(cfg, kind, resumed),
            "num_gpus": cfg.ray.num_gpus,
            "object_store_memory": (cfg.ray.object_store_memory_mb or 0) * 2**20 or None,
            "include_dashboard": False,
            "_metrics_export_port": cfg.ray.metrics_export_port,
        },
        local_what=(
            "ray: cannot start a local Ray instance "
            f"(ray.num_cpus={cfg.ray.num_cpus}, "
            f"ray.object_store_memory_mb={cfg.ray.object_store_memory_mb})"
        ),
    )
    if state != "running":
        _drop_ray_data_actor_args_error()
        _quiet_ray_data_console()
    if state != "started" and work:
        check_cluster(cfg, kind, resumed)
    ctx = DataContext.get_current()
    # Progress bars redraw many times a second: fine on a terminal, a flood in job logs.
    tty = sys.stderr.isatty()
    ctx.enable_progress_bars = tty
    ctx.enable_operator_progress_bars = tty


def check_cluster(cfg: JobConfig, kind: JobKind, resumed: bool = False) -> None:
    """A Ray this job did not start, against its pools: refused at start (one line, the
    numbers) when the autoscaler's limits say they can never be placed, a warning with the
    numbers when it is short now (it may grow)."""
    budget.check_cluster_cpus(cfg, kind, resumed)
    gpus.check_cluster_gpus(cfg, kind)


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
