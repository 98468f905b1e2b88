"""Progress counting and rendering, without Ray: the tally, batch counts, both output modes."""

import io
import logging
import re
import sys
import time

import pyarrow as pa
import pytest

from k3batch.job_actor import Tally
from k3batch.metrics import error_kinds
from k3batch.observe import batch_stats, stage_name
from k3batch.progress import Rate, Reporter, Snapshot, StageInfo, render
from k3batch.stages.generate import GenerateStage
from k3batch.stages.write import WriteImagesStage

ORDER = [
    StageInfo("validate"),
    StageInfo("generate", gpus_per_actor=0.5, actor_pool=True),
    StageInfo("write_images"),
]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def stats(stage, rows, ok=None, error_rows=0, errors=None, seconds=1.0, images=0):
    return {
        "stage": stage,
        "rows": rows,
        "ok": rows - error_rows if ok is None else ok,
        "images": images,
        "error_rows": error_rows,
        "errors": errors or {},
        "seconds": seconds,
    }


def test_stage_names_and_error_kinds():
    assert stage_name(WriteImagesStage) == "write_images"
    assert stage_name(GenerateStage) == "generate"
    assert error_kinds("prompt: empty; width: must be a positive multiple of 64, got 63") == [
        "prompt",
        "width",
    ]
    assert error_kinds("generate: RuntimeError: boom") == ["generate"]
    assert error_kinds(None) == [] and error_kinds("") == []


def test_batch_stats_counts_only_rows_that_fail_in_this_stage():
    before = pa.table({"id": ["a", "b", "c"], "status": ["ok", "error", "ok"]})
    after = pa.table(
        {
            "id": ["a", "b", "c"],
            "status": ["ok", "error", "error"],
            "error": [None, "prompt: empty", "generate: RuntimeError: out of memory"],
        }
    )
    s = batch_stats("generate", before, after, 2.5, makes_images=True)
    assert (s.rows, s.ok, s.images, s.error_rows) == (3, 1, 1, 1)
    assert s.errors == {"generate": 1}  # the row that came in failed is not counted again
    first = batch_stats("validate", pa.table({"prompt": ["x", ""]}), after.slice(1, 2), 0.1)
    assert first.error_rows == 2 and first.errors == {"prompt": 1, "generate": 1}
    assert first.images == 0


def test_tally_snapshot_done_errors_and_gpu_seconds():
    tally = Tally()
    tally.add(stats("validate", 10, error_rows=2, errors={"prompt": 2}))
    tally.add(stats("generate", 4, images=4, seconds=3.0), ("actor-1", 100.0, 110.0))
    tally.add(stats("generate", 4, ok=3, error_rows=1, errors={"generate": 1}, images=3), ("actor-1", 100.0, 120.0))  # fmt: skip
    tally.add(stats("generate", 2, images=2), ("actor-2", 105.0, 115.0))
    tally.add(stats("write_images", 4))
    snap = Snapshot(total=10, elapsed=30.0, order=ORDER, stages=tally.snapshot())
    assert snap.done == 4 and snap.images == 4 and snap.errors == 3
    gen = snap.stages["generate"]
    assert gen["rows"] == 10 and gen["batches"] == 3 and gen["errors"] == {"generate": 1}
    assert gen["actors"] == 2 and gen["actor_seconds"] == 30.0  # (120-100) + (115-105)
    cost = snap.cost()
    assert cost["actor_seconds"] == 30.0 and cost["gpu_seconds"] == 15.0  # x 0.5 GPU
    assert cost["gpu_seconds_per_image"] == 15.0 / 4
    assert list(cost["stages"]) == ["validate", "generate", "write_images"]
    assert cost["stages"]["write_images"]["actor_pool"] is False


def test_render_shows_rows_rate_errors_and_eta():
    snap = Snapshot(
        total=40, elapsed=75, order=ORDER, stages={"write_images": {"rows": 10, "ok": 9}}
    )
    line = render(snap, images_per_s=2.0, rows_per_s=2.0)
    assert line == "10/40 rows (25%), 2.00 images/s, 0 errors, ETA 15s, elapsed 1m15s"
    assert "ETA ?" in render(snap, None, None)
    done = Snapshot(total=40, elapsed=3700, order=ORDER, stages={"write_images": {"rows": 40}})
    assert "ETA 0s, elapsed 1h01m" in render(done, None, None)
    # Rows that make several images each: the count is of records, and says so.
    records = Snapshot(total=144, elapsed=5, order=ORDER, stages=done.stages, unit="records")
    assert render(records, None, None).startswith("40/144 records (28%)")


def test_summary_says_each_count_once_rows_and_records_apart():
    from k3batch.job.kinds import JobKind
    from k3batch.summary import summary

    class Kind(JobKind):
        def output_lines(self, run):
            return []

    run = {
        "output": "out/x", "rows_in": 36, "rows_out": 36, "ok": 36, "error": 0,
        "rows_this_run": 36, "skipped_by_resume": 0, "errors_by_field": {},
        "wall_seconds": 9.0, "images_per_second": 4.0, "accounting": {"ok": True},
    }  # fmt: skip
    one = summary(run, Kind()).splitlines()
    assert one[1:4] == [
        "rows in/out   36 / 36",
        "ok / errors   36 / 0",
        "this run      36 rows; 0 finished earlier, skipped",
    ]
    several = {**run, "records_expected": 144, "rows_out": 144, "ok": 140, "error": 4}
    several.update(rows_this_run=100, skipped_by_resume=44)
    lines = summary(several, Kind()).splitlines()
    assert lines[1:5] == [
        "rows in       36 (144 records: num_images_per_prompt)",
        "records out   144",
        "ok / errors   140 / 4 records",
        "this run      100 records; 44 finished earlier, skipped",
    ]
    for text in (one, lines):  # each count once: no second line about skipped rows
        assert sum("finished earlier" in line or "skipped" in line for line in text) == 1


def test_rate_uses_a_window():
    rate = Rate(window=10)
    assert rate.update(0.0, 0) is None
    assert rate.update(5.0, 10) == 2.0
    rate.update(20.0, 40)
    assert rate.update(30.0, 60) == 2.0  # over the last 10 s, not since 0


def snapshot_source():
    tally = Tally()
    tally.add(stats("write_images", 3))
    return lambda: Snapshot(total=6, elapsed=2.0, order=ORDER, stages=tally.snapshot())


def test_log_mode_prints_plain_lines_without_redraws():
    stream = io.StringIO()
    reporter = Reporter(stream, interval=3600)
    reporter.notes.append("metrics at http://127.0.0.1:1/metrics")
    source = snapshot_source()
    reporter.start(source, total=6)
    reporter.stop(source())
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == "k3batch: metrics at http://127.0.0.1:1/metrics"
    assert lines[-1].startswith("k3batch progress: 3/6 rows (50%)")
    assert len(lines) == 3  # the note, the first update, the final line: no redraw flood


def screen(output: str) -> list[str]:
    """What a terminal shows after `output`: \\r, \\n and erase-to-end-of-line applied."""
    lines, col = [""], 0
    for token in re.split(r"(\r|\n|\x1b\[K)", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            lines.append("")
            col = 0
        elif token == "\x1b[K":
            lines[-1] = lines[-1][:col]
        elif token:
            lines[-1] = lines[-1][:col] + token + lines[-1][col + len(token) :]
            col += len(token)
    return lines


def test_terminal_mode_redraws_one_line():
    stream = Terminal()
    reporter = Reporter(stream, tty_interval=3600)
    assert reporter.tty
    source = snapshot_source()
    reporter.start(source, total=6)
    reporter.stop(source())
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.count("\r") == 2  # drawn, redrawn, then finished
    assert screen(out) == ["3/6 rows (50%), - images/s, 0 errors, ETA ?, elapsed 2s", ""]


def test_terminal_mode_prints_other_output_above_the_line(monkeypatch):
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    # Like Ray Data's console handler: it keeps the stream it was made with.
    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("k3batch-test-ray-data")
    logger.addHandler(handler)
    logger.propagate = False
    reporter = Reporter(stream, tty_interval=3600)
    source = snapshot_source()
    reporter.start(source, total=6)
    print("worker output", file=sys.stderr)  # forwarded worker lines go to sys.stderr
    sys.stderr.write("half a ")
    sys.stderr.write("line\n")
    logger.warning("a Ray log line")
    reporter.stop(source())
    logger.removeHandler(handler)
    assert sys.stderr is stream and handler.stream is stream  # both given back
    shown = screen(stream.getvalue())
    assert shown[:3] == ["worker output", "half a line", "a Ray log line"]
    assert shown[3].startswith("3/6 rows (50%)") and shown[4:] == [""]


@pytest.mark.slow
def test_tracker_counts_batches_of_real_ray_stages(ray_local):
    """Stages on Ray report to the tally actor: tasks, then an actor pool of the same stage."""
    import ray.data

    from k3batch.dataflow import map_stage
    from k3batch.progress import Tracker
    from k3batch.rows.rules import RowRules
    from k3batch.stages.validate import ValidateStage

    rows = [{"id": f"r{i}", "prompt": "" if i % 5 == 0 else f"p{i}"} for i in range(20)]
    kwargs = {"rules": RowRules(width=64, height=64)}
    with Tracker(total=20) as tracker:
        ds = map_stage(ray.data.from_items(rows), ValidateStage, kwargs, batch_size=4, num_cpus=0.25, tracker=tracker)  # fmt: skip
        ds = map_stage(ds, ValidateStage, kwargs, batch_size=4, num_cpus=0.25, actors=(1, 1), tracker=tracker)  # fmt: skip
        assert ds.count() == 20
    snap = tracker.final
    assert [s.name for s in snap.order] == ["validate", "validate_2"]
    assert snap.done == 20 and snap.images == 16
    # Rows that failed in the first stage are not counted again by the second.
    assert snap.errors == 4 and snap.stages["validate"]["errors"] == {"prompt": 4}
    pool = snap.stages["validate_2"]
    assert pool["rows"] == 20 and pool["actors"] == 1 and pool["actor_seconds"] > 0
    assert snap.stages["validate"]["actors"] == 0


@pytest.mark.slow
def test_an_unreachable_tally_never_fails_a_batch(ray_local, caplog):
    import ray

    from k3batch.job_actor import Tally
    from k3batch.observe import StageObserver
    from k3batch.rows.rules import RowRules
    from k3batch.stages.validate import ValidateStage

    tally = ray.remote(num_cpus=0)(Tally).remote()
    ray.kill(tally)
    observer = StageObserver.for_stage(ValidateStage, tally=tally)
    table = pa.table({"id": ["a", "b"], "prompt": ["x", ""]})
    out = observer.apply(ValidateStage(RowRules()), table)
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert observer.tally is None and "progress tally unreachable" in caplog.text


def test_a_restarted_job_actor_gets_its_counts_back():
    """Merging an earlier incarnation's state adds to what the new one counted since."""
    from k3batch.job_actor import JobActor

    old = JobActor()
    old.add(stats("generate", 4, images=4), ("actor-1", 100.0, 110.0))
    old.start("batch-a")
    old.record_devices({"actor_id": "actor-1", "stage": "generation"})
    new = JobActor()
    assert new.incarnation != old.incarnation
    new.add(stats("generate", 2, images=2), ("actor-1", 100.0, 130.0))
    new.start("batch-a")
    new.restore(old.state())
    gen = new.snapshot()["generate"]
    assert (gen["rows"], gen["images"], gen["batches"], gen["busy_seconds"]) == (6, 6, 2, 2.0)
    assert gen["actors"] == 1 and gen["actor_seconds"] == 30.0  # one span, 100 to 130
    assert new.start("batch-a") == 2  # both starts before count as unfinished
    assert new.device_records() == [{"actor_id": "actor-1", "stage": "generation"}]


def _add(tracker, rows):
    import ray

    ray.get(tracker.tally.add.remote(stats("write_images", rows)))


@pytest.mark.slow
def test_the_job_actor_restarts_with_its_counts_and_its_loss_is_said_once(ray_local, caplog):
    """Its process killed, Ray starts it again and the driver hands back the last state it
    read; killed for good, the driver says once what the job goes on without, and the end
    of the job uses the last state read."""
    import ray

    from k3batch.progress import Tracker

    with caplog.at_level(logging.WARNING, logger="k3batch.progress"):
        with Tracker(total=20) as tracker:
            tracker.register("write_images")
            _add(tracker, 5)
            assert tracker.snapshot().done == 5
            first = tracker.read()["incarnation"]
            ray.kill(tracker.tally, no_restart=False)  # the process dies; Ray restarts it
            # The kill takes effect a moment later; a read during the restart waits for the
            # new process (calls are retried), and the first read of it restores it.
            deadline = time.monotonic() + 60
            while tracker.read()["incarnation"] == first:
                assert time.monotonic() < deadline, "the job actor did not restart"
            assert tracker.restarts == 1
            _add(tracker, 3)
            assert tracker.snapshot().done == 8
            assert "restarted after its process died" in caplog.text
            ray.kill(tracker.tally)  # gone for good
            assert tracker.snapshot().done == 8
            assert tracker.snapshot().done == 8  # said once, however often it is read
        lines = [r.getMessage() for r in caplog.records if "is lost" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "progress stops at 8 of 20 rows" in lines[0] and "no longer isolated" in lines[0]
    assert tracker.final.done == 8 and tracker.lost.startswith("ActorDiedError")
