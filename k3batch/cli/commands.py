"""The `k3batch` commands' handlers: each takes the parsed arguments and returns the exit
code (`k3batch.cli.parser` wires them to their sub-commands). Heavy imports stay inside."""

from __future__ import annotations

import json
import os
import sys

# Where `submit` finds the dashboard without --address (Ray's own `ray job submit` reads these).
SUBMIT_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def _write_report(output: str, args, storage_settings: dict | None = None) -> str | None:
    """The report's index URI, or None (with a one-line warning) if it could not be written."""
    from k3batch.report.page import write_report

    try:
        return write_report(
            output,
            samples=args.samples,
            columns=args.columns,
            thumb=args.thumb_size,
            storage_settings=storage_settings,
        ).index_uri
    except Exception as e:  # noqa: BLE001 - the job's outcome stands without a report
        print(f"k3batch: could not write the report: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _env_seconds(name: str) -> float | None:
    from k3batch.config import ConfigError

    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be a number of seconds above 0, got {raw!r}")
    return value


def run(args) -> int:
    from k3batch.config import load_config
    from k3batch.job.run import run_job
    from k3batch.progress import Reporter
    from k3batch.summary import accounting_problem, summary

    overrides = [*args.set, *(["output.overwrite=true"] if args.overwrite else [])]
    interval = args.progress_interval or _env_seconds("K3BATCH_PROGRESS_INTERVAL")
    reporter = None if args.no_progress else Reporter(interval=interval)
    result = run_job(load_config(args.config, overrides), reporter)
    settings = result.run["config"].get("storage")
    report = None if args.no_report else _write_report(result.run["output"], args, settings)
    print(summary(result.run, result.kind, report))
    if not result.ok:
        print(f"k3batch: accounting failed: {accounting_problem(result.run)}", file=sys.stderr)
        return 1
    return 0


def report(args) -> int:
    from k3batch.config import ConfigError
    from k3batch.report.page import write_report

    try:
        report = write_report(
            args.output, samples=args.samples, columns=args.columns, thumb=args.thumb_size
        )
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if report.counted_from == "stats":
        print("counted from  the metadata files' stats files (*_stats.json)")
    else:
        print(
            f"counted from  the metadata rows ({report.files_without_stats} file(s) without "
            "a stats file)"
        )
    print(f"contact sheet {report.contact_sheet_uri} ({len(report.samples)} images)")
    print(f"report        {report.index_uri}")
    return 0


def make_tiny(args) -> int:
    from k3batch.testing.tiny_sets import EXTRA_SETS

    for tiny_set in EXTRA_SETS:
        if getattr(args, tiny_set.option.lstrip("-")):
            print(tiny_set.build(args.dir))
            return 0
    from k3batch.model import family

    options = {"null_embedding": not args.no_null_embedding, "layout": args.layout}
    print(family.FAMILIES[args.family].make_tiny(args.dir, size=args.size, **options))
    return 0


def convert(args) -> int:
    from k3batch.model.kandinsky3.convert import convert

    members = args.members.split(",") if args.members else None
    try:
        written = convert(args.src, args.dst, members, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"k3batch convert: {e}", file=sys.stderr)
        return 2
    print(f"converted {', '.join(written)} from {args.src} to {args.dst} (diffusers layout)")
    return 0


def chat_template(args) -> int:
    from k3batch.beautify.prompt import CHAT_TEMPLATE

    print(CHAT_TEMPLATE)
    return 0


def config(args) -> int:
    from k3batch.config import JobConfig, load_config

    if args.schema:
        print(json.dumps(JobConfig.model_json_schema(), indent=2))
        return 0
    if args.reference:
        from k3batch.docs import config_reference

        print(config_reference(), end="")
        return 0
    cfg = load_config(args.config, args.set)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def serve(args) -> int:
    from k3batch.serve.launch import load_serve_config, serve_forever

    spec = load_serve_config(args.config, args.set)
    serve_forever(spec, host=args.host, port=args.port, address=args.address)
    return 0


def submit(args) -> int:
    from k3batch.config import ConfigError
    from k3batch.ray_start.connect import target
    from k3batch.submit import submit

    where = target(args.address, "--address", env=SUBMIT_ADDRESS_ENV)
    if where.local:
        raise ConfigError("submit needs --address http://HEAD:8265 (or RAY_ADDRESS)")
    return submit(
        where,
        args.config,
        args.set,
        wait=args.wait,
        working_dir=args.working_dir,
        job_id=args.job_id,
    )
