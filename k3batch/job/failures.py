"""Failure diagnosis: one line for a job that stopped part-way, saying what stopped it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from k3batch import gpus, storage
from k3batch.config import JobConfig
from k3batch.progress import Tracker
from k3batch.ray_start import budget
from k3batch.ray_start.connect import first_line

if TYPE_CHECKING:
    from k3batch.job.kinds import JobKind


class JobFailed(RuntimeError):
    """The job stopped part-way (stall, storage, a stage's error): one line saying why.
    Rows committed before it are kept; rerunning the same command resumes."""


RESUME_HINT = "rows finished before are kept; rerun the same command to resume"


def _causes(error: BaseException):
    """The exception and every exception it was raised from. A Ray task error stands in
    for its `cause` (the exception the task raised; the wrapper's text is a traceback)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            todo.insert(0, inner)
        else:
            yield e
        todo.append(e.__cause__ or e.__context__)


def stalled_stage(snapshot) -> tuple[str, int, int] | None:
    """(stage, rows it finished, rows that reached it) for the first stage behind its input."""
    expected = snapshot.total
    for info in snapshot.order:
        done = snapshot.stages.get(info.name, {}).get("rows", 0)
        if done < expected:
            return info.name, done, expected
        expected = done
    return None


def failure_message(
    cfg: JobConfig,
    error: Exception,
    tracker: Tracker,
    kind: JobKind | None = None,
    resumed: bool = False,
) -> str:
    """One line for a job that stopped part-way: what stopped it, and that a rerun resumes.
    `kind` (the job's) and `resumed`: to say, for a stall, when the cluster is too small for
    the job's pools now (a node lost for good)."""
    from ray.data import DataContext
    from ray.data.exceptions import ExecutionTimeoutError

    causes = list(_causes(error))
    unusable = gpus.unusable_gpu(causes)
    if unusable:
        return unusable  # a rerun would fail the same way: no resume hint
    if any(isinstance(c, ExecutionTimeoutError) for c in causes):
        timeout = (
            cfg.faults.stall_timeout_s or DataContext.get_current().execution_no_progress_timeout_s
        )
        try:
            where = stalled_stage(tracker.snapshot())
        except Exception:  # noqa: BLE001 - the message does without the stage
            where = None
        stage = (
            f"stage {where[0]!r} stopped after {where[1]} of {where[2]} rows"
            if where
            else "the final write stopped"
        )
        short = None
        if kind is not None:
            try:
                short = budget.cpu_shortfall(cfg, kind, resumed)
            except Exception:  # noqa: BLE001 - the message does without the cluster's size
                short = None
        why = (
            f"waiting for CPUs: {short}"
            if short
            else "a worker stuck in a batch, or waiting for resources"
        )
        return (
            f"faults.stall_timeout_s: no stage made progress for {timeout:g} s; {stage} "
            f"({why}); {RESUME_HINT}"
        )
    for c in causes:
        if isinstance(c, storage.StorageError):
            return f"{str(c).splitlines()[0]}; {RESUME_HINT}"
    for c in causes:
        if storage.unavailable(c):
            return (
                f"output.uri: storage failed at {cfg.output.uri} after "
                f"{cfg.storage.max_attempts} attempts (storage.max_attempts): {first_line(c)}; "
                f"{RESUME_HINT}"
            )
    # The first exception that is not Ray's own (executor errors wrap the stage's).
    root = next((c for c in causes if not type(c).__module__.startswith("ray.")), causes[0])
    return f"the job failed: {first_line(root)}; {RESUME_HINT}"
