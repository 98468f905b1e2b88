"""`k3batch` command line: run a job, build tiny models, show the config schema."""

from __future__ import annotations

import argparse
import json
import sys


def _run(args) -> int:
    from k3batch.config import load_config
    from k3batch.runner import run_job, summary

    overrides = [*args.set, *(["output.overwrite=true"] if args.overwrite else [])]
    result = run_job(load_config(args.config, overrides))
    print(summary(result.run))
    return 0 if result.ok else 1


def _make_tiny(args) -> int:
    from k3batch.model.tiny import make_tiny

    path = make_tiny(
        args.dir, null_embedding=not args.no_null_embedding, overwrite=True, layout=args.layout
    )
    print(f"tiny Kandinsky 3 family checkpoint ({args.layout} layout) written to {path}")
    return 0


def _convert(args) -> int:
    from k3batch.model.convert import convert

    members = args.members.split(",") if args.members else None
    try:
        written = convert(args.src, args.dst, members, args.dtype, args.overwrite)
    except (FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"k3batch convert: {e}", file=sys.stderr)
        return 2
    print(f"converted {', '.join(written)} from {args.src} to {args.dst} (diffusers layout)")
    return 0


def _config(args) -> int:
    from k3batch.config import JobConfig, load_config

    if args.schema:
        print(json.dumps(JobConfig.model_json_schema(), indent=2))
        return 0
    cfg = load_config(args.config, args.set)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k3batch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a batch job described by a YAML config")
    run.add_argument("config", help="job config (YAML), e.g. configs/demo.yaml")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config field, e.g. --set resources.batch_size=8 (repeatable)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in output.uri"
    )
    run.set_defaults(func=_run)

    tiny = sub.add_parser(
        "make-tiny", help="write a tiny random-weight Kandinsky 3 family checkpoint"
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
    tiny.set_defaults(func=_make_tiny)

    conv = sub.add_parser(
        "convert",
        help="convert a reference-layout checkpoint (ai-forever/Kandinsky3.1) to k3batch's "
        "diffusers family layout in safetensors",
    )
    conv.add_argument("src", help="reference checkpoint: a directory with weights/, or a repo id")
    conv.add_argument("dst", help="directory to write (diffusers family layout)")
    conv.add_argument(
        "--members",
        help="comma-separated subset of kandinsky3,kandinsky3-flash,kandinsky3-inpaint "
        "(default: every member found)",
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
    config.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    config.add_argument("--schema", action="store_true", help="print the config's JSON schema")
    config.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from k3batch.config import ConfigError

    args = build_parser().parse_args(argv)
    if args.command == "config" and not args.schema and not args.config:
        print("k3batch config: give a CONFIG or --schema", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"k3batch: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
