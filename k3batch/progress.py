"""A job's live progress: the job actor's tally (`job_actor.py`), fed by every stage, read by
the driver's `Tracker` and printed by a reporter.

Each stage's workers send their batch counts to one small named-less Ray actor (the job
actor, 0 CPUs, on the driver's node), whose handle `dataflow.map_stage` puts into the stage's arguments when it is given
the job's `Tracker` (`JobContext.tracker`). Ray's own writer stays as it is; rows are done when they leave the last stage
(`map_stage` registers stages in pipeline order). The driver's `Reporter` thread polls the
tally: on a terminal it redraws one line; in a job log it prints a line every N seconds.

The tally also yields what run.json keeps about cost: busy seconds per stage and the
seconds each pool actor held its resources (start, model load included, to its last batch),
from which GPU-seconds per image follow.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from k3batch.crashes import lost
from k3batch.job_actor import STATE_INTERVAL_S, stage_snapshot, start_job_actor

log = logging.getLogger(__name__)

TTY_INTERVAL_S = 0.5
LOG_INTERVAL_S = 30.0
RATE_WINDOW_S = 60.0
CALL_TIMEOUT_S = 60


@dataclass
class StageInfo:
    name: str
    gpus_per_actor: float = 0.0
    actor_pool: bool = False


@dataclass
class Snapshot:
    """The job so far, as the driver sees it."""

    total: int
    elapsed: float
    order: list[StageInfo]
    stages: dict[str, dict] = field(default_factory=dict)
    unit: str = "rows"  # what `total` counts: "records" when rows make several images

    def _last(self) -> dict:
        return self.stages.get(self.order[-1].name, {}) if self.order else {}

    @property
    def done(self) -> int:
        return self._last().get("rows", 0)

    @property
    def images(self) -> int:
        return self._last().get("ok", 0)

    @property
    def errors(self) -> int:
        return sum(s.get("error_rows", 0) for s in self.stages.values())

    def cost(self) -> dict:
        """run.json's timing: per stage, and GPU/actor seconds over the images written."""
        stages = {}
        gpu_seconds = actor_seconds = 0.0
        for info in self.order:
            s = self.stages.get(info.name, {})
            held = s.get("actor_seconds", 0.0)
            stages[info.name] = {
                "rows": s.get("rows", 0),
                "batches": s.get("batches", 0),
                "busy_seconds": round(s.get("busy_seconds", 0.0), 3),
                "errors": s.get("errors", {}),
                "actor_pool": info.actor_pool,
                "actors": s.get("actors", 0),
                "actor_seconds": round(held, 3),
                "gpus_per_actor": info.gpus_per_actor,
            }
            gpu_seconds += held * info.gpus_per_actor
            actor_seconds += held
        images = self.images
        return {
            "stages": stages,
            "gpu_seconds": round(gpu_seconds, 3),
            "gpu_seconds_per_image": round(gpu_seconds / images, 4) if images else None,
            "actor_seconds": round(actor_seconds, 3),
            "actor_seconds_per_image": round(actor_seconds / images, 4) if images else None,
        }


class Tracker:
    """Driver side of a job's progress: the job actor, the stage order, the reporter.

    A thread reads the job actor's state every `STATE_INTERVAL_S` seconds (the reporter's
    reads count too) and keeps the last one: a restarted actor gets it back (`JobActor`),
    and an actor lost for good is said once, with what stops working; the job goes on, and
    its end uses the last state read."""

    def __init__(self, total: int, reporter: Reporter | None = None, unit: str = "rows"):
        self.total = total
        self.unit = unit
        self.reporter = reporter
        self.order: list[StageInfo] = []
        self.tally = None
        self.started = time.monotonic()
        self.final: Snapshot | None = None
        self.devices: list[dict] = []  # run.json's `devices`: one record per model actor
        self.restarts = 0  # restarts of the job actor seen
        self.lost: str | None = None  # why the job actor is gone for good, once it is
        self._state: dict | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    def __enter__(self) -> Tracker:
        self.tally = start_job_actor()
        self.started = time.monotonic()
        self._watch = threading.Thread(
            target=self._watch_loop, name="k3batch-job-actor", daemon=True
        )
        self._watch.start()
        if self.reporter is not None:
            self.reporter.start(self.snapshot, self.total)
        return self

    def _watch_loop(self) -> None:
        while not self._stop.wait(STATE_INTERVAL_S):
            try:
                self.read()
            except Exception as e:  # noqa: BLE001 - the next read may do better
                log.debug("could not read the job actor: %s", e)

    def register(self, name: str, gpus_per_actor: float = 0.0, actor_pool: bool = False) -> str:
        """A stage joins the job, in pipeline order; returns its name, made unique (`x_2`)."""
        taken = {info.name for info in self.order}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        self.order.append(StageInfo(unique, gpus_per_actor or 0.0, actor_pool))
        return unique

    def read(self) -> dict | None:
        """The job actor's state (restored into it first when it restarted); the last state
        read once it is lost. None before any read succeeded."""
        import ray

        with self._lock:
            if self.tally is None or self.lost is not None:
                return self._state
            try:
                state = ray.get(self.tally.state.remote(), timeout=CALL_TIMEOUT_S)
                if self._state is not None and state["incarnation"] != self._state["incarnation"]:
                    ray.get(self.tally.restore.remote(self._state), timeout=CALL_TIMEOUT_S)
                    state = ray.get(self.tally.state.remote(), timeout=CALL_TIMEOUT_S)
                    self.restarts += 1
                    log.warning(
                        "k3batch: the job actor (progress tally, crash journal) restarted after "
                        "its process died; its counts are restored from %.0f s before, so what "
                        "ended in between is not counted (progress and run.json's stage counts "
                        "may come out short by it)",
                        STATE_INTERVAL_S,
                    )
            except Exception as e:
                if not lost(e):
                    raise
                self._lose(e)
                return self._state
            self._state = state
            return state

    def _lose(self, e: Exception) -> None:
        """Say once what the job goes on without."""
        text = str(e).strip().splitlines()
        self.lost = f"{type(e).__name__}: {text[0] if text else ''}"
        done = Snapshot(self.total, 0.0, list(self.order), self._stages(), self.unit).done
        log.warning(
            "k3batch: the job actor (progress tally, crash journal) is lost (%s). The job "
            "goes on and every row it writes is accounted for at the end, but progress stops "
            "at %d of %d %s, run.json's stage counts and devices stop there too, a row "
            "that kills its worker is no longer isolated (Ray retries it until "
            "faults.stall_timeout_s), and a failed run cannot stop its stuck actors",
            self.lost,
            done,
            self.total,
            self.unit,
        )

    def _stages(self) -> dict:
        state = self._state or {}
        return stage_snapshot(state.get("stages", {}), state.get("actors", {}))

    def snapshot(self) -> Snapshot:
        self.read()
        return Snapshot(
            self.total, time.monotonic() - self.started, list(self.order), self._stages(), self.unit
        )

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        if self._watch is not None:
            self._watch.join()
        try:
            self.final = self.snapshot()
        except Exception as e:  # noqa: BLE001 - progress must not hide the job's own error
            log.warning("k3batch: could not read the progress tally: %s", e)
            self.final = Snapshot(
                self.total,
                time.monotonic() - self.started,
                list(self.order),
                self._stages(),
                self.unit,
            )
        self.devices = list((self._state or {}).get("devices", {}).values())
        if self.reporter is not None:
            self.reporter.stop(self.final if exc[0] is None else None)
        if self.tally is not None:
            ray.kill(self.tally)
            self.tally = None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Rate:
    """Items per second over the last `window` seconds (responsive, but not jumpy)."""

    def __init__(self, window: float = RATE_WINDOW_S):
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, t: float, count: int) -> float | None:
        self.samples.append((t, count))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window:
            self.samples.popleft()
        t0, c0 = self.samples[0]
        return (count - c0) / (t - t0) if t > t0 and count > c0 else None


def render(snap: Snapshot, images_per_s: float | None, rows_per_s: float | None) -> str:
    """`12/36 rows (33%), 0.85 images/s, 1 errors, ETA 28s, elapsed 20s`."""
    pct = 100 * snap.done / snap.total if snap.total else 100.0
    left = snap.total - snap.done
    eta = 0.0 if left <= 0 else (left / rows_per_s if rows_per_s else None)
    speed = f"{images_per_s:.2f}" if images_per_s is not None else "-"
    return (
        f"{snap.done}/{snap.total} {snap.unit} ({pct:.0f}%), {speed} images/s, "
        f"{snap.errors} errors, ETA {_duration(eta)}, elapsed {_duration(snap.elapsed)}"
    )


class Reporter:
    """Prints progress: one redrawn line on a terminal, a plain line every N seconds otherwise."""

    def __init__(
        self,
        stream=None,
        interval: float | None = None,
        tty: bool | None = None,
        tty_interval: float = TTY_INTERVAL_S,
    ):
        """`interval`: seconds between lines in a log; a terminal redraws every `tty_interval`."""
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = tty_interval if self.tty else (interval or LOG_INTERVAL_S)
        self.notes: list[str] = []  # printed once at start (e.g. where the metrics are)
        self._images = Rate()
        self._rows = Rate()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._line = ""  # the progress line now on the terminal ("" when none)
        self._midline = False  # other output left the cursor mid-line: do not draw over it
        self._stderr = None  # the real sys.stderr while ours stands in for it
        self._handlers: list[logging.StreamHandler] = []  # log handlers pointed at ours

    def start(self, snapshot, total: int) -> None:
        for note in self.notes:
            self._write(f"k3batch: {note}\n")
        if self.tty:
            # Route other output through us so it prints above the progress line: forwarded
            # worker output goes to whatever sys.stderr is, Ray's log handlers hold the stream.
            self._stderr = sys.stderr
            sys.stderr = above = _AboveProgress(self, self._stderr)
            self._handlers = [h for h in _stream_handlers() if h.stream is self._stderr]
            for handler in self._handlers:
                handler.setStream(above)
        self._thread = threading.Thread(
            target=self._loop, args=(snapshot,), name="k3batch-progress", daemon=True
        )
        self._thread.start()

    def _loop(self, snapshot) -> None:
        while True:
            try:
                self.show(snapshot())
            except Exception as e:  # noqa: BLE001 - a missed update is not worth a crash
                log.debug("progress update failed: %s", e)
            if self._stop.wait(self.interval):
                return

    def show(self, snap: Snapshot, final: bool = False) -> None:
        now = time.monotonic()
        line = render(
            snap, self._images.update(now, snap.images), self._rows.update(now, snap.done)
        )
        if not self.tty:
            self._write(f"k3batch progress: {line}\n")
            return
        with self._lock:
            if self._midline and not final:
                return
            # Carriage return and erase-to-end: the line redraws in place.
            self._write(
                ("\n" if self._midline else "") + f"\r{line}\x1b[K" + ("\n" if final else "")
            )
            self._line, self._midline = ("" if final else line), False

    def _foreign(self, text: str, stream) -> None:
        """Other output while the line shows: clear the line, print it, redraw below."""
        with self._lock:
            if self._line and not self._midline:
                self._write("\r\x1b[K")
            stream.write(text)
            stream.flush()
            self._midline = not text.endswith("\n")
            if self._line and not self._midline:
                self._write(f"\r{self._line}\x1b[K")

    def stop(self, final: Snapshot | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._stderr is not None:
            for handler in self._handlers:
                if isinstance(handler.stream, _AboveProgress):
                    handler.setStream(self._stderr)
            if isinstance(sys.stderr, _AboveProgress):
                sys.stderr = self._stderr
            self._stderr, self._handlers = None, []
        if final is not None:
            self.show(final, final=True)
        elif self.tty and self._line:
            self._write("\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        h
        for logger in loggers
        if isinstance(logger, logging.Logger)
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


class _AboveProgress:
    """Stands in for sys.stderr while a terminal progress line shows."""

    def __init__(self, reporter: Reporter, stream):
        self._reporter = reporter
        self._stream = stream

    def write(self, text: str) -> int:
        if text:
            self._reporter._foreign(text, self._stream)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)
