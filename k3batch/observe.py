"""Watches each stage's batches: Prometheus metrics, plus the job's progress tally when one runs.

`dataflow.map_stage` gives every stage a `StageObserver`; the Ray worker that runs the stage
calls `observer.apply(stage, table)` instead of `apply_stage`. Neither metrics nor the tally
may fail a batch: their errors are logged and dropped.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from k3batch import schema
from k3batch.crashes import lost
from k3batch.metrics import APP_BATCH, error_kinds, metrics
from k3batch.schema import STATUS_ERROR, STATUS_OK
from k3batch.stages.base import Stage, run_stage

log = logging.getLogger(__name__)

# A stage that adds this column produces images (GenerateStage, and its siblings).
IMAGE_COLUMN = "image_rgb"
TALLY_TIMEOUT_S = 60


def stage_name(stage_cls: type) -> str:
    """`WriteImagesStage` -> `write_images`: the `stage` tag and the name in run.json. A
    stage subclassed elsewhere (fault injection in tests) keeps its production name."""
    stage_cls = next(
        (c for c in stage_cls.__mro__ if c.__module__.startswith("k3batch.stages.")), stage_cls
    )
    name = stage_cls.__name__.removesuffix("Stage") or stage_cls.__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass
class BatchStats:
    """What one batch did in one stage."""

    stage: str
    rows: int = 0
    ok: int = 0
    images: int = 0
    error_rows: int = 0  # rows that became errors in this stage (not those that came in failed)
    errors: dict[str, int] = field(default_factory=dict)  # kind -> rows
    seconds: float = 0.0


def batch_stats(
    stage: str,
    table_in,
    table_out,
    seconds: float,
    makes_images: bool = False,
    source: list[int] | None = None,
) -> BatchStats:
    """Count a batch: rows out, ok rows, images made, and the rows this stage turned to errors.
    `source`: the input row of each output row, when the stage expanded rows."""
    status_out = (
        table_out.column(schema.STATUS).to_pylist()
        if schema.STATUS in table_out.column_names
        else []
    )
    status_in = (
        table_in.column(schema.STATUS).to_pylist()
        if schema.STATUS in table_in.column_names
        else [None] * table_in.num_rows
    )
    if source is not None:
        status_in = [status_in[i] for i in source]
    errors_out = (
        table_out.column(schema.ERROR).to_pylist()
        if schema.ERROR in table_out.column_names
        else [None] * len(status_out)
    )
    stats = BatchStats(stage=stage, rows=table_out.num_rows, seconds=seconds)
    for before, after, error in zip(status_in, status_out, errors_out, strict=False):
        if after == STATUS_OK:
            stats.ok += 1
        elif after == STATUS_ERROR and before != STATUS_ERROR:
            stats.error_rows += 1
            for kind in error_kinds(error):
                stats.errors[kind] = stats.errors.get(kind, 0) + 1
    if makes_images:
        stats.images = stats.ok
    return stats


@dataclass
class StageObserver:
    """Picklable: travels to the Ray workers inside the stage's map_batches arguments."""

    stage: str
    makes_images: bool = False
    tally: Any = None  # the job's progress tally actor, or None
    # The driver watches the tally (`progress.Tracker`) and says once for the job when it is
    # lost: then each worker only notes it in its debug log.
    watched: bool = False
    app: str = APP_BATCH
    actor_id: str | None = None  # set in an actor pool's actor: its seconds are counted
    actor_started: float | None = None

    @classmethod
    def for_stage(cls, stage_cls: type[Stage], tally=None) -> StageObserver:
        return cls(
            stage=stage_name(stage_cls), makes_images=IMAGE_COLUMN in stage_cls.adds, tally=tally
        )

    def in_actor(self) -> StageObserver:
        """A copy for one pool actor, started now (before its model loads)."""
        return replace(self, actor_id=uuid.uuid4().hex, actor_started=time.time())

    def apply(self, stage: Stage, table):
        start = time.perf_counter()
        out, source = run_stage(stage, table)
        seconds = time.perf_counter() - start
        # Observing must never fail a batch: errors are logged once per process and dropped.
        try:
            stats = batch_stats(self.stage, table, out, seconds, self.makes_images, source)
            self._metrics(stats)
        except Exception as e:  # noqa: BLE001
            _warn_once("metrics", f"k3batch: could not record metrics of {self.stage}: {e}")
            return out
        if self.tally is not None:
            try:
                self._tally(stats)
            except Exception as e:  # noqa: BLE001
                if self.watched and lost(e):
                    log.debug("k3batch: the progress tally is lost, counting stops: %s", e)
                else:
                    _warn_once("tally", f"k3batch: progress tally unreachable, counting stops: {e}")
                self.tally = None
        return out

    def _metrics(self, stats: BatchStats) -> None:
        m = metrics(self.app)
        m.rows(stats.stage, stats.rows)
        m.images(stats.stage, stats.images)
        m.errors(stats.stage, stats.errors)
        m.latency(stats.stage, stats.seconds)

    def _tally(self, stats: BatchStats) -> None:
        import ray

        actor = (self.actor_id, self.actor_started, time.time()) if self.actor_id else None
        # Waited for: the driver's final count must include this batch.
        ray.get(self.tally.add.remote(asdict(stats), actor), timeout=TALLY_TIMEOUT_S)


_warned: set[str] = set()


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning(message)
