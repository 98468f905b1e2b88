"""Runs a job: pre-flight checks, Ray start-up, the pipeline, accounting and run.json."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

from k3batch import __version__, storage
from k3batch.config import ConfigError, JobConfig

log = logging.getLogger(__name__)

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class InputInfo:
    files: list[str]
    columns: list[str]
    num_rows: int


@dataclass
class RunResult:
    run: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.run["accounting"]["ok"]


def resolve_paths(cfg: JobConfig) -> JobConfig:
    """Local paths absolute: Ray workers need not share the driver's working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.input.uri = storage.absolute(cfg.input.uri)
    cfg.output.uri = storage.absolute(cfg.output.uri)
    if os.path.exists(cfg.model.path) or cfg.model.make_tiny:
        cfg.model.path = os.path.abspath(cfg.model.path)
    return cfg


def inspect_input(cfg: JobConfig) -> InputInfo:
    """Parquet footers only: the input exists, has the prompt column, and how many rows."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(cfg.input.uri)
    try:
        if not fs.exists(path):
            raise ConfigError(f"input.uri: no such file or directory: {cfg.input.uri}")
        files = (
            [path]
            if fs.isfile(path)
            else sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        )
    except ConfigError:
        raise
    except Exception as e:  # storage errors: unreachable endpoint, credentials, permissions
        raise ConfigError(
            f"input.uri: cannot read {cfg.input.uri}: {type(e).__name__}: {e}"
        ) from None
    if not files:
        raise ConfigError(f"input.uri: no .parquet files under {cfg.input.uri}")
    try:
        dataset = pads.dataset(files, filesystem=fs, format="parquet")
        columns = dataset.schema.names
        num_rows = dataset.count_rows()
    except Exception as e:
        raise ConfigError(
            f"input.uri: not a readable Parquet table: {cfg.input.uri}: {e}"
        ) from None
    if cfg.input.prompt_column not in columns:
        raise ConfigError(
            f"input.prompt_column: column {cfg.input.prompt_column!r} is not in the input table "
            f"(columns: {', '.join(columns)})"
        )
    return InputInfo(files=files, columns=columns, num_rows=num_rows)


def check_model(cfg: JobConfig) -> None:
    from k3batch.model import family

    m = cfg.model
    path = m.path
    if m.make_tiny:
        return
    if os.path.isdir(path):
        missing = family.missing_files(path, m.name, m.refine, m.layout)
        if missing:
            raise ConfigError(
                f"model.path: {path} has no {', '.join(missing)} for model.name={m.name}"
                + (" with model.refine" if m.refine else "")
            )
        return
    if os.path.exists(path) or not _HF_REPO_ID.match(path):
        raise ConfigError(
            f"model.path: {path!r} is neither a checkpoint directory nor a Hugging Face repo id"
        )


def prepare_output(cfg: JobConfig) -> None:
    fs, root = storage.filesystem(cfg.output.uri)
    try:
        previous = [p for p in ("metadata", "images", "run.json") if fs.exists(f"{root}/{p}")]
        if previous and not cfg.output.overwrite:
            raise ConfigError(
                f"output.uri: {cfg.output.uri} already holds a run ({', '.join(previous)}); "
                "choose a new output or pass --overwrite"
            )
        for p in previous:
            fs.rm(f"{root}/{p}", recursive=True)
        fs.makedirs(root, exist_ok=True)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"output.uri: cannot write to {cfg.output.uri}: {type(e).__name__}: {e}"
        ) from None


def preflight(cfg: JobConfig) -> tuple[JobConfig, InputInfo]:
    """Everything that can fail before Ray starts and before any model loads."""
    cfg = resolve_paths(cfg)
    info = inspect_input(cfg)
    check_model(cfg)
    prepare_output(cfg)
    return cfg, info


def init_ray(cfg: JobConfig) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs = (
            {"address": address}
            if address
            else {
                "num_cpus": cfg.ray.num_cpus,
                "object_store_memory": (cfg.ray.object_store_memory_mb or 0) * 2**20 or None,
                "include_dashboard": False,
            }
        )
        ray.init(**kwargs, logging_level=logging.WARNING)
    ctx = DataContext.get_current()
    # Progress bars redraw many times a second: fine on a terminal, a flood in job logs.
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.enable_operator_progress_bars = sys.stderr.isatty()


def account(cfg: JobConfig, info: InputInfo) -> dict:
    """Rows in = rows out = ok + error, no id twice: read back from the written metadata."""
    import pyarrow.dataset as pads

    fs, root = storage.filesystem(storage.join(cfg.output.uri, "metadata"))
    files = sorted(f for f in fs.find(root) if f.endswith(".parquet"))
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(
        columns=["id", "status", "error", "warning"]
    )
    ids = table.column("id").to_pylist()
    statuses = Counter(table.column("status").to_pylist())
    duplicates = sorted(i for i, c in Counter(ids).items() if c > 1)
    errors_by_field = Counter()
    for err in table.column("error").to_pylist():
        if err:
            for part in err.split("; "):
                errors_by_field[part.split(":", 1)[0]] += 1
    warnings_by_field = Counter()
    for warning in table.column("warning").to_pylist():
        if warning:
            for part in warning.split("; "):
                warnings_by_field[part.split(":", 1)[0]] += 1
    rows_out = len(ids)
    ok = statuses.get("ok", 0)
    failed = statuses.get("error", 0)
    return {
        "rows_in": info.num_rows,
        "rows_out": rows_out,
        "ok": ok,
        "error": failed,
        "errors_by_field": dict(errors_by_field.most_common()),
        "warnings_by_field": dict(warnings_by_field.most_common()),
        "accounting": {
            "ok": rows_out == info.num_rows and ok + failed == rows_out and not duplicates,
            "duplicate_ids": duplicates[:100],
            "num_duplicate_ids": len(duplicates),
        },
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"k3batch": __version__, "python": platform.python_version()}
    for name in ("ray", "torch", "diffusers", "transformers", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_job(cfg: JobConfig) -> RunResult:
    from pipelines import text_to_image

    started = time.time()
    started_at = datetime.now(timezone.utc).isoformat()
    cfg, info = preflight(cfg)
    init_ray(cfg)
    if cfg.model.make_tiny:
        # Build once on the driver so local actors find it ready (they would build the same).
        from k3batch.model.tiny import make_tiny

        make_tiny(
            cfg.model.path, layout="reference" if cfg.model.layout == "reference" else "diffusers"
        )
    text_to_image.run(cfg)
    counts = account(cfg, info)
    wall = time.time() - started
    run = {
        "k3batch_version": __version__,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(counts["ok"] / wall, 4) if wall > 0 else None,
        **{k: v for k, v in counts.items() if k != "accounting"},
        "accounting": counts["accounting"],
        "input_files": len(info.files),
        "output": cfg.output.uri,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
    }
    fs, root = storage.filesystem(cfg.output.uri)
    fs.pipe_file(f"{root}/run.json", json.dumps(run, indent=2).encode())
    return RunResult(run=run)


def summary(run: dict) -> str:
    lines = [
        f"output        {run['output']}",
        f"rows in/out   {run['rows_in']} / {run['rows_out']}",
        f"ok / errors   {run['ok']} / {run['error']}",
        f"wall time     {run['wall_seconds']:.1f} s ({run['images_per_second']:.2f} images/s)",
    ]
    if run["errors_by_field"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in run["errors_by_field"].items())
        lines.append(f"errors by     {kinds}")
    if run.get("warnings_by_field"):
        kinds = ", ".join(f"{k}: {v}" for k, v in run["warnings_by_field"].items())
        lines.append(f"warnings by   {kinds} (see the metadata's `warning` column)")
    if not run["accounting"]["ok"]:
        acc = run["accounting"]
        lines.append(
            f"ACCOUNTING FAILED: rows in {run['rows_in']}, rows out {run['rows_out']}, "
            f"duplicate ids ({acc['num_duplicate_ids']}): {acc['duplicate_ids'][:10]}"
        )
    lines.append(f"images        {storage.join(run['output'], 'images')}/")
    lines.append(f"metadata      {storage.join(run['output'], 'metadata')}/ (Parquet)")
    lines.append(f"run report    {storage.join(run['output'], 'run.json')}")
    return "\n".join(lines)
