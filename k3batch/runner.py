"""Runs a job: pre-flight checks, Ray start-up, the pipeline, accounting and run.json."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from k3batch import __version__, gpus, outputs, resume, storage
from k3batch.config import ConfigError, JobConfig
from k3batch.progress import Reporter, Tracker
from k3batch.ray_start import (
    check_local_cpus,
    first_line,
    init_ray,
    starts_local_ray,
)

log = logging.getLogger(__name__)

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class InputInfo:
    files: list[str]
    columns: list[str]
    num_rows: int
    schema: object = None  # pyarrow.Schema: every input file's columns, unified
    duplicate_ids: dict = field(default_factory=dict)  # id -> rows that give it (2 or more)


class JobFailed(RuntimeError):
    """The job stopped part-way (stall, storage, a stage's error): one line saying why.
    Rows committed before it are kept; rerunning the same command resumes."""


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
    if cfg.beautify.backend == "vllm" and (
        os.path.exists(cfg.beautify.model) or cfg.beautify.make_tiny
    ):
        cfg.beautify.model = os.path.abspath(cfg.beautify.model)
    return cfg


def inspect_input(cfg: JobConfig) -> InputInfo:
    """Parquet footers only: the input exists, has the prompt column, and how many rows."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(cfg.input.uri, cfg.storage.model_dump())
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
        schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
        num_rows = dataset.count_rows()
    except Exception as e:
        raise ConfigError(
            f"input.uri: not a readable Parquet table: {cfg.input.uri}: {e}"
        ) from None
    schema = unified_schema(files, schemas)
    columns = schema.names
    if cfg.input.prompt_column not in columns:
        raise ConfigError(
            f"input.prompt_column: column {cfg.input.prompt_column!r} is not in the input table "
            f"(columns: {', '.join(columns)})"
        )
    beautified = cfg.input.beautified_prompt_column
    if beautified and beautified not in columns:
        raise ConfigError(
            f"input.beautified_prompt_column: column {beautified!r} is not in the input table "
            f"(columns: {', '.join(columns)})"
        )
    duplicates = {}
    if cfg.input.id_column in columns:
        try:
            ids = pads.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table(
                columns=[cfg.input.id_column]
            )
        except Exception as e:
            raise ConfigError(f"input.uri: cannot read {cfg.input.uri}: {e}") from None
        duplicates = repeated_ids(ids.column(0), cfg.input.id_column)
    return InputInfo(
        files=files, columns=columns, num_rows=num_rows, schema=schema, duplicate_ids=duplicates
    )


MAX_DUPLICATE_IDS = 10_000


def value_counts(column, at_least: int = 1) -> dict:
    """value -> rows holding it, for the values at least `at_least` rows hold. Counted in
    Arrow: only those values become Python objects, not one per row of a large table."""
    import pyarrow.compute as pc

    counts = pc.value_counts(column)
    if at_least > 1:
        counts = counts.filter(pc.greater_equal(counts.field("counts"), at_least))
    return dict(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
    )


def repeated_ids(column, name: str) -> dict[str, int]:
    """Ids that more than one input row gives (as ValidateStage spells ids), with counts.

    Such rows would share an image key and overwrite each other's image: they become row
    errors instead. A table where nearly every id repeats is refused: its id column is not
    an id.
    """
    repeated: dict[str, int] = {}
    for value, n in value_counts(column, at_least=2).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, str) and value):
            repeated[str(value)] = repeated.get(str(value), 0) + n
    if len(repeated) > MAX_DUPLICATE_IDS:
        shown = ", ".join(repr(v) for v in list(repeated)[:5])
        raise ConfigError(
            f"input.id_column: {len(repeated)} values of column {name!r} repeat (e.g. {shown}); "
            "ids must be unique: fix the column, or name another with input.id_column"
        )
    return repeated


def unified_schema(files: list[str], schemas: list):
    """One schema for all input files: a column missing from a file reads as nulls there
    (so its rows fail on a missing prompt, row by row), int32 and int64 unify, and so on.

    Ray Data infers its schema from a sample of the files and cannot read a column that is a
    number in one file and text in another: such input is refused here, naming the column.
    """
    import pyarrow as pa

    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    seen: dict[str, tuple] = {}
    for path, schema in zip(files, schemas, strict=True):
        for column in schema:
            if column.name not in seen:
                seen[column.name] = (column.type, path)
                continue
            first_type, first_path = seen[column.name]
            try:
                pa.unify_schemas(
                    [pa.schema([(column.name, first_type)]), pa.schema([column])],
                    promote_options="permissive",
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                raise ConfigError(
                    f"input.uri: column {column.name!r} is {first_type} in {first_path} but "
                    f"{column.type} in {path}; every input file must give a column one type"
                ) from None
    raise ConfigError("input.uri: the input files' schemas cannot be combined")


def check_model(cfg: JobConfig) -> None:
    b = cfg.beautify
    local_llm = b.make_tiny or os.path.isdir(b.model)
    if b.enabled and b.backend == "vllm" and not local_llm:  # noqa: SIM102 - reads as two rules
        if os.path.exists(b.model) or not _HF_REPO_ID.match(b.model):
            raise ConfigError(
                f"beautify.model: {b.model!r} is neither a model directory nor a Hugging Face "
                "repo id"
            )
    if cfg.job == "beautify":
        return  # no diffusion model involved
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
    check_hub_model(path)


# A file each layout's repo has at its top: what the local cache must hold in offline mode.
_HUB_MARKERS = ("model_index.json", "unet/config.json", "weights/movq.pt")


def check_hub_model(repo_id: str) -> None:
    """A Hub repo id must name a repo (online) or one in the local cache (HF_HUB_OFFLINE),
    rather than fail in every actor after Ray has started."""
    from huggingface_hub import constants, repo_exists, try_to_load_from_cache

    if constants.is_offline_mode():
        if not any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in _HUB_MARKERS):
            raise ConfigError(
                f"model.path: {repo_id!r} is not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set; download it first or give a local directory"
            )
        return
    try:
        exists = repo_exists(repo_id)
    except Exception as e:  # noqa: BLE001 - the Hub unreachable from here: the workers retry
        log.warning("k3batch: could not ask the Hugging Face Hub about %s: %s", repo_id, e)
        return
    if not exists:
        raise ConfigError(
            f"model.path: no Hugging Face repo {repo_id!r} (a private or gated repo needs HF_TOKEN)"
        )


def prepare_output(cfg: JobConfig) -> bool:
    """Start, resume or refuse: returns True when the output holds this job to resume.

    A new (or overwritten) output records the job's fingerprint first, so even a run killed
    in its first minute can be resumed.
    """
    fs, root = storage.filesystem(cfg.output.uri, cfg.storage.model_dump())
    identity = resume.job_identity(cfg)
    try:
        previous = [p for p in outputs.ENTRIES if fs.exists(f"{root}/{p}")]
        if previous and cfg.output.overwrite:
            outputs.clear(fs, root)
        elif previous:
            job = resume.read_job(fs, root)
            if job is None:
                raise ConfigError(
                    f"output.uri: {cfg.output.uri} already holds files ({', '.join(previous)}) "
                    "but no k3batch job to resume; choose a new output or pass --overwrite"
                )
            if job["fingerprint"] != resume.fingerprint(identity):
                changed = resume.differences(job["job"], identity)
                raise ConfigError(
                    f"output.uri: {cfg.output.uri} holds a run of a different job "
                    f"(changed: {', '.join(changed) or 'fingerprint'}); rerun with the same "
                    "config to resume, choose a new output, or pass --overwrite"
                )
            return True
        fs.makedirs(root, exist_ok=True)
        resume.write_job(fs, root, identity)
        return False
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"output.uri: cannot write to {cfg.output.uri}: {type(e).__name__}: {e}"
        ) from None


def preflight(cfg: JobConfig) -> tuple[JobConfig, InputInfo, bool]:
    """Everything that can fail before Ray starts and before any model loads."""
    cfg = resolve_paths(cfg)
    check_local_cpus(cfg)
    local = starts_local_ray(cfg)
    gpus.check_local_gpus(cfg, local=local)
    if local:
        gpus.warn_local_gpu_memory(cfg)
    info = inspect_input(cfg)
    check_model(cfg)
    resumed = prepare_output(cfg)
    return cfg, info, resumed


SHOWN_IDS = 100  # ids listed per accounting problem in run.json (all are counted)


def account(cfg: JobConfig, info: InputInfo) -> dict:
    """Rows in = rows out = ok + error, no row and no id twice: read back from the written
    records (across every run into this output, each row once). When rows are missing or
    doubled, the input is read again (through Ray, for its row hashes) to name them."""
    table = outputs.read_records(
        cfg,
        outputs.record_files(cfg),
        columns=["id", "status", "error"],
        optional=(*BEAUTIFY_COLUMNS, "warning", resume.ID_COLUMN),
    )
    beautify_columns = [c for c in BEAUTIFY_COLUMNS if c in table.column_names]
    # Counted in Arrow: only repeated ids and the rows in error become Python objects (a
    # table of millions of rows would otherwise be millions of them in the driver).
    statuses = value_counts(table.column("status").drop_null())
    duplicates = sorted(value_counts(table.column("id").drop_null(), at_least=2))
    repeated_rows = (
        sum(
            c - 1
            for c in value_counts(table.column(resume.ID_COLUMN).drop_null(), at_least=2).values()
        )
        if resume.ID_COLUMN in table.column_names
        else 0
    )
    errors_by_field = _fields_named(table.column("error"))
    warnings_by_field = (
        _fields_named(table.column("warning")) if "warning" in table.column_names else Counter()
    )
    rows_out = table.num_rows
    ok = statuses.get("ok", 0)
    failed = statuses.get("error", 0)
    missing, unexpected = [], []
    if resume.ID_COLUMN in table.column_names and (rows_out != info.num_rows or repeated_rows):
        missing, unexpected = compare_with_input(cfg, info, table)
    out = {
        "rows_in": info.num_rows,
        "rows_out": rows_out,
        "ok": ok,
        "error": failed,
        "errors_by_field": dict(errors_by_field.most_common()),
        "warnings_by_field": dict(warnings_by_field.most_common()),
        "accounting": {
            "ok": rows_out == info.num_rows
            and ok + failed == rows_out
            and not duplicates
            and not repeated_rows
            and not missing
            and not unexpected,
            "rows_in": info.num_rows,
            "rows_out": rows_out,
            "ok_plus_error": ok + failed,
            "other_status": rows_out - ok - failed,
            "duplicate_ids": duplicates[:SHOWN_IDS],
            "num_duplicate_ids": len(duplicates),
            "rows_written_twice": repeated_rows,
            "missing_ids": missing[:SHOWN_IDS],
            "num_missing": len(missing),
            "unexpected_ids": unexpected[:SHOWN_IDS],
            "num_unexpected": len(unexpected),
        },
    }
    if beautify_columns:
        out["beautify"] = beautify_counts(table)
    return out


def _fields_named(column) -> Counter:
    """How many rows name each field in an error (or warning) text like "prompt: ...; seed: ..."."""
    import pyarrow.compute as pc

    found = Counter()
    texts = column.drop_null()
    for text in texts.filter(pc.not_equal(texts, "")).to_pylist():
        for part in text.split("; "):
            found[part.split(":", 1)[0]] += 1
    return found


def compare_with_input(cfg: JobConfig, info: InputInfo, table) -> tuple[list, list]:
    """Ids of input rows without a record, and of records of no input row, by row hash (the
    identity Ray gives each input row; user ids may repeat)."""
    from k3batch import rows
    from k3batch.dataflow import read_input
    from k3batch.stages.validate import ROW_HASH

    ds = read_input(cfg, info.schema)
    id_column = cfg.input.id_column if cfg.input.id_column in info.columns else None
    input_hashes, input_ids = [], []
    for batch in ds.select_columns([c for c in (id_column, ROW_HASH) if c]).iter_batches(
        batch_format="pyarrow", batch_size=None
    ):
        hashes = batch.column(ROW_HASH).to_pylist()
        input_hashes += hashes
        # As ValidateStage names rows: the id column, or an id derived from the row hash.
        given = batch.column(id_column).to_pylist() if id_column else [None] * len(hashes)
        input_ids += [
            i if isinstance(i, (str, int)) and i != "" else rows.derived_id(h)
            for i, h in zip(given, hashes, strict=True)
        ]
    out_hashes = table.column(ROW_HASH).to_pylist()
    out_ids = table.column("id").to_pylist()
    written = set(out_hashes)
    known = set(input_hashes)
    missing = [str(i) for h, i in zip(input_hashes, input_ids, strict=True) if h not in written]
    unexpected = [str(i) for h, i in zip(out_hashes, out_ids, strict=True) if h not in known]
    return missing, unexpected


BEAUTIFY_COLUMNS = ("beautified_prompt", "beautify_error", "beautify_fallback")


def beautify_counts(table) -> dict:
    """How many rows the LLM beautified, how many requests failed, and which prompt was used."""
    counts = {}
    if "beautified_prompt" in table.column_names:
        counts["beautified"] = sum(1 for t in table.column("beautified_prompt").to_pylist() if t)
    if "beautify_error" in table.column_names:
        counts["errors"] = sum(1 for e in table.column("beautify_error").to_pylist() if e)
    if "beautify_fallback" in table.column_names:
        fallbacks = Counter(table.column("beautify_fallback").to_pylist())
        counts["fallbacks"] = {str(k): v for k, v in fallbacks.most_common()}
    return counts


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
    from pipelines import beautify, text_to_image

    started = time.time()
    started_at = datetime.now(UTC).isoformat()
    cfg, info, resumed = preflight(cfg)
    if resumed and cfg.job == "beautify":
        raise ConfigError(
            f"output.uri: {cfg.output.uri} already holds this beautify job; beautify-only jobs "
            "do not resume: pass --overwrite"
        )
    init_ray(cfg, resumed)
    if cfg.model.make_tiny and cfg.job == "text_to_image":
        # Build once on the driver so local actors find it ready (they would build the same).
        from k3batch.model.tiny import make_tiny

        make_tiny(
            cfg.model.path, layout="reference" if cfg.model.layout == "reference" else "diffusers"
        )
    if cfg.beautify.enabled and cfg.beautify.make_tiny:
        from k3batch.model.tiny_llm import make_tiny_llm

        make_tiny_llm(cfg.beautify.model)
    if reporter is not None:
        _take_over_progress(reporter)
    before = set(outputs.record_files(cfg))
    # Progress counts this run's rows: those an earlier run finished are skipped.
    todo = (
        max(info.num_rows - outputs.count_rows(cfg, sorted(before), skip_unreadable=True), 0)
        if before
        else info.num_rows
    )
    with Tracker(todo, reporter) as tracker:
        try:
            if cfg.job == "beautify":
                beautify.run(cfg)
            else:
                # The tracker's actor is also the job's crash journal (progress.JobActor).
                text_to_image.run(
                    cfg, info.num_rows, info.schema, info.duplicate_ids, journal=tracker.tally
                )
        except Exception as e:
            raise JobFailed(failure_message(cfg, e, tracker)) from e
    # Record files from before that are still there hold rows an earlier run finished (Ray
    # deleted those of writes it had not committed); the new ones hold this run's rows.
    after = outputs.record_files(cfg)
    new = outputs.read_records(cfg, [f for f in after if f not in before], columns=["status"])
    generated = new.num_rows
    images = new.column("status").to_pylist().count("ok") if cfg.job == "text_to_image" else 0
    skipped = outputs.count_rows(cfg, [f for f in after if f in before])
    if cfg.job == "text_to_image":
        outputs.finalise(cfg, info.num_rows)
    counts = account(cfg, info)
    wall = time.time() - started
    run = {
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
        **tracker.final.cost(),
        "devices": tracker.devices,
        "input_files": len(info.files),
        "output": cfg.output.uri,
        "format": cfg.output.format,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
    }
    fs, root = storage.filesystem(cfg.output.uri, cfg.storage.model_dump())
    fs.pipe_file(f"{root}/run.json", json.dumps(run, indent=2).encode())
    return RunResult(run=run)


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


def failure_message(cfg: JobConfig, error: Exception, tracker: Tracker) -> str:
    """One line for a job that stopped part-way: what stopped it, and that a rerun resumes."""
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
        return (
            f"faults.stall_timeout_s: no stage made progress for {timeout:g} s; {stage} "
            f"(a worker stuck in a batch, or waiting for resources); {RESUME_HINT}"
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


def accounting_problem(run: dict) -> str:
    """One line naming what broke the invariant, and which ids (the first ten of each)."""
    acc = run["accounting"]
    parts = [f"rows in {run['rows_in']}, rows out {run['rows_out']}"]
    if acc.get("other_status"):
        parts.append(f"{acc['other_status']} rows neither ok nor error")
    for label, count, ids in (
        ("missing", "num_missing", "missing_ids"),
        ("not in the input", "num_unexpected", "unexpected_ids"),
        ("ids twice", "num_duplicate_ids", "duplicate_ids"),
    ):
        if acc.get(count):
            parts.append(f"{label} ({acc[count]}): {', '.join(map(repr, acc[ids][:10]))}")
    if acc.get("rows_written_twice"):
        parts.append(f"{acc['rows_written_twice']} rows written twice")
    return "; ".join(parts)


def _cost_line(run: dict) -> str | None:
    """GPU-seconds per image; on CPU (no GPUs) the pool actors' seconds per image instead."""
    if run.get("gpu_seconds_per_image") is None and run.get("actor_seconds_per_image") is None:
        return None
    pools = {n: s for n, s in run.get("stages", {}).items() if s.get("actor_pool")}
    actors = sum(s["actors"] for s in pools.values())
    gpus = max((s["gpus_per_actor"] for s in pools.values()), default=0)
    if run.get("gpu_seconds"):
        return (
            f"{run['gpu_seconds_per_image']:.2f} GPU-s/image "
            f"({actors} actors x {gpus:g} GPU, {run['gpu_seconds']:.1f} GPU-s in all)"
        )
    per_image = run.get("actor_seconds_per_image")
    shown = f"{per_image:.2f}" if per_image is not None else "-"
    return f"0 GPU-s/image (no GPUs; {shown} actor-s/image over {actors} pool actors)"


def summary(run: dict, report: str | None = None) -> str:
    """The table the CLI prints at the end of a run."""
    lines = [
        f"output        {run['output']}",
        f"rows in/out   {run['rows_in']} / {run['rows_out']}",
        f"ok / errors   {run['ok']} / {run['error']}",
        f"this run      {run.get('rows_this_run', run['rows_out'])} rows; "
        f"{run.get('skipped_by_resume', 0)} finished earlier, skipped",
    ]
    if run["errors_by_field"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in run["errors_by_field"].items())
        lines.append(f"errors by     {kinds}")
    lines.append(f"skipped       {run.get('skipped_by_resume', 0)} (done by an earlier run)")
    lines.append(
        f"wall time     {run['wall_seconds']:.1f} s ({run['images_per_second']:.2f} images/s)"
    )
    cost = _cost_line(run)
    if cost:
        lines.append(f"GPU time      {cost}")
    if run.get("stages"):
        busy = ", ".join(f"{n} {s['busy_seconds']:.1f} s" for n, s in run["stages"].items())
        lines.append(f"stage time    {busy} (busy, summed over workers)")
    if run.get("warnings_by_field"):
        kinds = ", ".join(f"{k}: {v}" for k, v in run["warnings_by_field"].items())
        lines.append(f"warnings by   {kinds} (see the metadata's `warning` column)")
    if not run["accounting"]["ok"]:
        lines.append(f"ACCOUNTING FAILED: {accounting_problem(run)}")
    if "beautify" in run:
        b = run["beautify"]
        fallbacks = ", ".join(f"{k}: {v}" for k, v in b.get("fallbacks", {}).items())
        lines.append(
            f"beautified    {b.get('beautified', 0)} (LLM errors {b.get('errors', 0)})"
            + (f"; prompt used: {fallbacks}" if fallbacks else "")
        )
    out = run["output"]
    if run["config"].get("job", "text_to_image") != "text_to_image":
        lines.append(f"prompts       {storage.join(out, 'metadata')}/ (Parquet)")
    elif run.get("format", "files") == "files":
        lines.append(f"images        {storage.join(out, 'images')}/")
        lines.append(f"metadata      {storage.join(out, 'metadata')}/ (Parquet)")
    else:
        lines.append(f"shards        {storage.join(out, 'shards')}/ (webdataset + Parquet index)")
    lines.append(f"run record    {storage.join(out, 'run.json')}")
    if report:
        lines.append(f"report        {report}")
    return "\n".join(lines)
