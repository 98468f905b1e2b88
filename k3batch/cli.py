"""`k3batch` command line: run a job, report on it, build tiny models, show the config."""

from __future__ import annotations

import argparse
import json
import os
import sys


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


# Where `submit` finds the dashboard without --address (Ray's own `ray job submit` reads these).
SUBMIT_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

RUN_RAY = (
    "Ray: with ray.address (or RAY_ADDRESS) set, the job joins that cluster or fails within "
    "seconds with one line (exit code 2); without one it starts a fresh local Ray of its own, "
    "never a cluster a `ray start` on this machine recorded (ray.address: auto joins the Ray "
    "running here)."
)
SERVE_RAY = (
    "Ray: with --address (or RAY_ADDRESS), the server joins that cluster (host:port, "
    "ray://host:port, or auto: the Ray running on this machine) or fails within seconds "
    "with one line (exit code 2); without one it starts a fresh local Ray of its own. "
    "Deployments whose replicas the Ray cannot place are refused at start (exit code 2). "
    "SIGTERM or Ctrl-C shuts Serve and Ray down (on a joined cluster: this config's "
    "applications, and Serve if none is left), exit code 0."
)
SUBMIT_RAY = (
    "The job runs on the cluster whose dashboard --address names (else RAY_API_SERVER_ADDRESS "
    "or RAY_ADDRESS); one that cannot be reached is one line within seconds (exit code 2). "
    "Nothing starts on this machine."
)


def _positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number above 0, got {raw!r}")
    return int(raw)


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {raw!r}")
    return value


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


def _run(args) -> int:
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


def _report(args) -> int:
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


def _make_tiny(args) -> int:
    if args.llm:
        from k3batch.testing.tiny_llm import make_tiny_llm

        path = make_tiny_llm(args.dir, overwrite=True)
        print(f"tiny random Mistral LLM (Hugging Face layout, for vLLM) written to {path}")
        return 0
    from k3batch.model import family

    options = {"null_embedding": not args.no_null_embedding, "layout": args.layout}
    print(family.FAMILIES[args.family].make_tiny(args.dir, size=args.size, **options))
    return 0


def _convert(args) -> int:
    from k3batch.model.kandinsky3.convert import convert

    members = args.members.split(",") if args.members else None
    try:
        written = convert(args.src, args.dst, members, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"k3batch convert: {e}", file=sys.stderr)
        return 2
    print(f"converted {', '.join(written)} from {args.src} to {args.dst} (diffusers layout)")
    return 0


def _chat_template(args) -> int:
    from k3batch.beautify.prompt import CHAT_TEMPLATE

    print(CHAT_TEMPLATE)
    return 0


def _config(args) -> int:
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


def _serve(args) -> int:
    from k3batch.serve.launch import load_serve_config, serve_forever

    spec = load_serve_config(args.config, args.set)
    serve_forever(spec, host=args.host, port=args.port, address=args.address)
    return 0


def _submit(args) -> int:
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


def _report_options(parser: argparse.ArgumentParser) -> None:
    from k3batch.report.page import DEFAULT_COLUMNS, DEFAULT_SAMPLES, DEFAULT_THUMB

    group = parser.add_argument_group("report")
    group.add_argument(
        "--samples",
        type=_positive_int,
        default=DEFAULT_SAMPLES,
        help=f"images on the contact sheet and page (default {DEFAULT_SAMPLES})",
    )
    group.add_argument(
        "--columns",
        type=_positive_int,
        default=DEFAULT_COLUMNS,
        help=f"contact sheet columns (default {DEFAULT_COLUMNS})",
    )
    group.add_argument(
        "--thumb-size",
        type=_positive_int,
        default=DEFAULT_THUMB,
        metavar="PX",
        help=f"thumbnail box in pixels (default {DEFAULT_THUMB})",
    )


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    from k3batch.model import family
    from k3batch.model.kandinsky3 import members as k3_members

    parser = argparse.ArgumentParser(prog="k3batch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run a batch job described by a YAML config", description=RUN_RAY
    )
    run.add_argument("config", help="job config (YAML), e.g. configs/demo.yaml")
    _add_set(run, "override a config field, e.g. --set resources.batch_size=8 (repeatable)")
    run.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in output.uri"
    )
    run.add_argument(
        "--progress-interval",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default 30; "
        "env K3BATCH_PROGRESS_INTERVAL); on a terminal one line redraws twice a second",
    )
    run.add_argument("--no-progress", action="store_true", help="print no live progress")
    run.add_argument(
        "--no-report", action="store_true", help="do not write OUTPUT/report/ after the run"
    )
    _report_options(run)
    run.set_defaults(func=_run)

    report = sub.add_parser(
        "report",
        help="write OUTPUT/report/index.html and contact_sheet.png for a finished run",
    )
    report.add_argument("output", help="the run's output.uri (local path or fsspec URI)")
    _report_options(report)
    report.set_defaults(func=_report)

    tiny = sub.add_parser(
        "make-tiny",
        help="write a tiny random-weight Kandinsky 3 checkpoint (2.2: --family kandinsky2.2; "
        "LLM: --llm)",
    )
    tiny.add_argument("dir", help="directory to write")
    tiny.add_argument(
        "--layout",
        choices=["diffusers", "reference"],
        default="diffusers",
        help="k3batch's diffusers family layout (default) or ai-forever/Kandinsky3.1's weights/",
    )
    tiny.add_argument(
        "--no-null-embedding",
        action="store_true",
        help="leave out the null embeddings, like kandinsky-community/kandinsky-3 "
        "(diffusers layout)",
    )
    tiny.add_argument(
        "--size",
        choices=["tiny", "bench"],
        default="tiny",
        help="bench: wider UNet and MoVQ, a batch of about a second on a small CPU "
        "(the CPU benchmarks' model; diffusers layout)",
    )
    tiny.add_argument(
        "--family",
        choices=list(family.FAMILIES),
        default=family.MEMBERS[family.DEFAULT].family,
        help="which family's tiny set (the `model.path` of a `make_tiny` job): "
        + "; ".join(f"{name}: {f.tiny_set}" for name, f in family.FAMILIES.items()),
    )
    tiny.add_argument(
        "--llm",
        action="store_true",
        help="write a tiny random Mistral LLM instead (for the beautify tests and demo)",
    )
    tiny.set_defaults(func=_make_tiny)

    sbm = sub.add_parser(
        "submit", help="submit a job to a Ray cluster (Ray Jobs API)", description=SUBMIT_RAY
    )
    sbm.add_argument("config", help="job config (YAML) inside the project directory")
    sbm.add_argument(
        "--address",
        help="the cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
        "else RAY_ADDRESS; one is required); unreachable: one line and exit code 2",
    )
    sbm.add_argument(
        "--wait", action="store_true", help="stream the logs and exit with the job's outcome"
    )
    sbm.add_argument("--working-dir", help="directory to upload (default: the project root)")
    sbm.add_argument("--job-id", help="submission id (default: generated)")
    _add_set(sbm, "override a config field on the cluster (repeatable)")
    sbm.set_defaults(func=_submit)

    srv = sub.add_parser(
        "serve",
        help="serve a Ray Serve config (OpenAI Images API endpoint)",
        description=SERVE_RAY,
    )
    srv.add_argument("config", help="Serve config (YAML), e.g. configs/serve-demo.yaml")
    srv.add_argument("--host", help="override http_options.host")
    srv.add_argument("--port", type=int, help="override http_options.port")
    srv.add_argument(
        "--address",
        help="Ray cluster to join, e.g. 10.0.0.5:6379 or auto; unreachable: one line and exit "
        "code 2 (default: RAY_ADDRESS; without either, a fresh local Ray, never a recorded one)",
    )
    _add_set(
        srv,
        "override a field of the first application's args, e.g. --set batching.max_batch_size=8",
    )
    srv.set_defaults(func=_serve)

    template = sub.add_parser(
        "chat-template",
        help="print the Kandinsky 3.1 beautification chat template (for vllm serve --chat-template)",
    )
    template.set_defaults(func=_chat_template)

    conv = sub.add_parser(
        "convert",
        help="convert a reference-layout checkpoint (ai-forever/Kandinsky3.1) to k3batch's "
        "diffusers family layout in safetensors",
    )
    conv.add_argument("src", help="reference checkpoint: a directory with weights/, or a repo id")
    conv.add_argument("dst", help="directory to write (diffusers family layout)")
    conv.add_argument(
        "--members",
        help=f"comma-separated subset of {','.join(k3_members.NAMES)} (default: every member found)",
    )
    conv.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="cast the weights when writing (default: keep the source's dtype)",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    conv.set_defaults(func=_convert)

    config = sub.add_parser("config", help="validate and print a config, or print the JSON schema")
    config.add_argument("config", nargs="?", help="job config (YAML)")
    _add_set(config, "override a config field (repeatable)")
    config.add_argument("--schema", action="store_true", help="print the config's JSON schema")
    config.add_argument(
        "--reference",
        action="store_true",
        help="print the config reference as Markdown (docs/config.md)",
    )
    config.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 every row accounted for; 1 the job stopped part-way or its accounting
    failed; 2 a bad config, input or environment, found before any work."""
    from k3batch.config import ConfigError
    from k3batch.job.failures import JobFailed

    args = build_parser().parse_args(argv)
    if args.command == "config" and not (args.schema or args.reference or args.config):
        print("k3batch config: give a CONFIG, --schema or --reference", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"k3batch: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"k3batch: job failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
