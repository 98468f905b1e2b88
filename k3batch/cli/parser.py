"""The `k3batch` command line's parser: every sub-command, its options and help texts.

The lists in the help come from the registries, so a new job kind (`pipelines/<kind>.py`),
model family (`k3batch.model.family.FAMILIES`) or tiny set (`k3batch.testing.tiny_sets`)
shows up in `run --help` and `make-tiny --help` without editing this module."""

from __future__ import annotations

import argparse

from k3batch.cli import commands

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


def _kinds_epilog() -> str:
    """`run --help`'s list of job kinds, from the registry (`job.kinds.all_kinds`)."""
    from k3batch.job import kinds

    lines = ["job kinds (`job:` in the config; default text_to_image):"]
    lines += [f"  {name}: {kind.summary}" for name, kind in kinds.all_kinds().items()]
    return "\n".join(lines)


def _tiny_sets_description() -> str:
    """`make-tiny --help`'s list of tiny sets: each family's (`Family.tiny_set`), then the
    others (`testing.tiny_sets`)."""
    from k3batch.model import family
    from k3batch.testing import tiny_sets

    lines = ["Random-weight models of the real architectures, built offline in seconds; DIR:"]
    lines += [f"  --family {name}: {fam.tiny_set}" for name, fam in family.FAMILIES.items()]
    lines += [f"  {t.option}: {t.what}" for t in tiny_sets.EXTRA_SETS]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from k3batch.model import family
    from k3batch.model.kandinsky3 import members as k3_members
    from k3batch.testing import tiny_sets

    parser = argparse.ArgumentParser(
        prog="k3batch",
        description="Kandinsky batch image generation on Ray: run a job, report on it, serve, "
        "build tiny models, show the config.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a batch job described by a YAML config",
        description=RUN_RAY,
        epilog=_kinds_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    run.set_defaults(func=commands.run)

    report = sub.add_parser(
        "report",
        help="write OUTPUT/report/index.html and contact_sheet.png for a finished run",
    )
    report.add_argument("output", help="the run's output.uri (local path or fsspec URI)")
    _report_options(report)
    report.set_defaults(func=commands.report)

    tiny = sub.add_parser(
        "make-tiny",
        help="write a tiny random-weight model set for tests and demos: a family's (Kandinsky "
        "3 by default, --family) or "
        + ", ".join(f"{t.option.lstrip('-')} ({t.option})" for t in tiny_sets.EXTRA_SETS),
        description=_tiny_sets_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="which family's tiny set (listed above; the `model.path` of a `make_tiny` job)",
    )
    extra = tiny.add_mutually_exclusive_group()
    for tiny_set in tiny_sets.EXTRA_SETS:
        extra.add_argument(
            tiny_set.option, action="store_true", help=f"write {tiny_set.what} instead"
        )
    tiny.set_defaults(func=commands.make_tiny)

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
    sbm.set_defaults(func=commands.submit)

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
    srv.set_defaults(func=commands.serve)

    template = sub.add_parser(
        "chat-template",
        help="print the Kandinsky 3.1 beautification chat template (for vllm serve --chat-template)",
    )
    template.set_defaults(func=commands.chat_template)

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
    conv.set_defaults(func=commands.convert)

    config = sub.add_parser("config", help="validate and print a config, or print the JSON schema")
    config.add_argument("config", nargs="?", help="job config (YAML)")
    _add_set(config, "override a config field (repeatable)")
    config.add_argument("--schema", action="store_true", help="print the config's JSON schema")
    config.add_argument(
        "--reference",
        action="store_true",
        help="print the config reference as Markdown (docs/config.md)",
    )
    config.set_defaults(func=commands.config)
    return parser
