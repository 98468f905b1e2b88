"""`run_job`: pre-flight, Ray start-up, the job kind's dataset, accounting and run.json."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from k3batch import __version__, resume, schema
from k3batch.config import ConfigError, JobConfig
from k3batch.job import kinds
from k3batch.job.accounting import account
from k3batch.job.failures import JobFailed, failure_message
from k3batch.job.kinds import JobContext, JobKind
from k3batch.job.preflight import preflight
from k3batch.outputs import records
from k3batch.progress import Reporter, Snapshot, Tracker
from k3batch.ray_start.jobs import init_ray
from k3batch.testing import faults


@dataclass
class RunResult:
    run: dict = field(default_factory=dict)
    kind: JobKind | None = None  # the job's kind (its summary lines)

    @property
    def ok(self) -> bool:
        return self.run["accounting"]["ok"]


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"k3batch": __version__, "python": platform.python_version()}
    for name in ("ray", "torch", "diffusers", "transformers", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _take_over_progress(reporter: Reporter) -> None:
    """k3batch's own progress line replaces Ray Data's bars (they would garble each other)."""
    from ray.data import DataContext

    from k3batch.metrics import metrics_url

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
    url = metrics_url()
    if url:
        reporter.notes.append(f"metrics at {url}")


def run_job(cfg: JobConfig, reporter: Reporter | None = None) -> RunResult:
    """Run the job; `reporter` (the CLI's) prints live progress, replacing Ray Data's bars."""
    started = time.time()
    started_at = datetime.now(UTC).isoformat()
    # The one look-up of the job's kind: everything below gets it from here.
    kind = kinds.get(cfg.job)
    cfg, info, output, resumed = preflight(cfg, kind)
    if resumed and not kind.resumes:
        raise ConfigError(
            f"output.uri: {cfg.output.uri} already holds this {cfg.job} job; {cfg.job} jobs "
            "do not resume: pass --overwrite"
        )
    fs, root = output.filesystem()
    listing = output.record_sizes()
    # A rerun with nothing left (the last run ended with every record accounted for, and
    # neither the input nor the record files changed since) ends here, from one listing:
    # no pools asked for, no dataset run, no record read, however large the output or small
    # the cluster has become.
    finished = resume.completed(fs, root, info, listing) if resumed else None
    init_ray(cfg, kind, resumed, work=finished is None)
    if finished is not None:
        skipped = finished["rows_out"]  # every record, made by earlier runs
        run = _record(cfg, kind, info, finished, started, started_at, resumed, 0, skipped, 0)
        run.update(**Snapshot(0, 0.0, []).cost(), devices=[])
        fs.pipe_file(f"{root}/run.json", json.dumps(run, indent=2).encode())
        return RunResult(run=run, kind=kind)
    before = sorted(listing)
    done_before = records.count_rows(output, before, skip_unreadable=True) if before else 0
    ctx = JobContext(kind, output, info.num_rows, info.num_records, info.schema, info.duplicate_ids)
    resume.clear_completed(fs, root)
    todo = info.num_records - done_before
    cost, devices = _run_dataset(cfg, kind, ctx, todo, resumed, reporter)
    before = set(before)
    # Record files from before that are still there hold rows an earlier run finished (Ray
    # deleted those of writes it had not committed); the new ones hold this run's rows.
    after = output.record_files()
    new = records.read_records(
        output, [f for f in after if f not in before], columns=[schema.STATUS]
    )
    generated = new.num_rows
    images = (
        new.column(schema.STATUS).to_pylist().count(schema.STATUS_OK) if kind.makes_images else 0
    )
    still = [f for f in after if f in before]
    # Every earlier file still there (no write of theirs was undone): counted at the start.
    skipped = done_before if len(still) == len(before) else records.count_rows(output, still)
    kind.finalise(cfg, ctx)
    counts = account(cfg, kind, info, output)
    run = _record(cfg, kind, info, counts, started, started_at, resumed, generated, skipped, images)
    run.update(**cost, devices=devices)
    fs.pipe_file(f"{root}/run.json", json.dumps(run, indent=2).encode())
    if run["accounting"]["ok"] and kind.resumes:
        # The record files as finalised (shards renumbered), and what the accounting found.
        resume.write_completed(fs, root, resume.completion(info, output.record_sizes(), counts))
    return RunResult(run=run, kind=kind)


def _record(
    cfg: JobConfig,
    kind: JobKind,
    info,
    counts: dict,
    started: float,
    started_at: str,
    resumed: bool,
    generated: int,
    skipped: int,
    images: int,
) -> dict:
    """run.json, but for the cost figures and devices: the accounting's `counts`, and this
    run's records (`generated`, of which `images` ok) and those an earlier run made."""
    wall = time.time() - started
    return {
        "k3batch_version": __version__,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(images / wall, 4) if wall > 0 else None,
        **{k: v for k, v in counts.items() if k != "accounting"},
        "resumed": resumed,
        "rows_this_run": generated,
        "skipped_by_resume": skipped,
        "accounting": {
            **counts["accounting"],
            "rows_this_run": generated,
            "skipped_by_resume": skipped,
        },
        "input_files": len(info.files),
        "output": cfg.output.uri,
        "format": cfg.output.format,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
    }


def _run_dataset(
    cfg: JobConfig,
    kind: JobKind,
    ctx: JobContext,
    todo: int,
    resumed: bool,
    reporter: Reporter | None,
) -> tuple[dict, list[dict]]:
    """Run the kind's dataset with the job's actor (progress tally and crash journal);
    returns run.json's cost figures and device records. `todo`: the records this run makes
    (an earlier run's are skipped), for the progress line."""
    kind.prepare(cfg)
    if cfg.beautify.enabled and cfg.beautify.make_tiny:
        from k3batch.testing.tiny_llm import make_tiny_llm

        make_tiny_llm(cfg.beautify.model)
    if reporter is not None:
        _take_over_progress(reporter)
    # Progress counts records (images) when rows make several, and says so.
    unit = "records" if ctx.num_records != ctx.num_rows else "rows"
    with Tracker(max(todo, 0), reporter, unit) as tracker, faults.stage_overrides() as overrides:
        try:
            # The tracker's actor is also the job's crash journal (job_actor.JobActor).
            kind.run(
                cfg,
                dataclasses.replace(
                    ctx, journal=tracker.tally, tracker=tracker, stage_overrides=overrides
                ),
            )
        except Exception as e:
            raise JobFailed(failure_message(cfg, e, tracker, kind, resumed)) from e
    return tracker.final.cost(), tracker.devices
