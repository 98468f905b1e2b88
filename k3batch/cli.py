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
    if args.llm:
        from k3batch.model.tiny_llm import make_tiny_llm

        path = make_tiny_llm(args.dir, overwrite=True)
        print(f"tiny random Mistral LLM (Hugging Face layout, for vLLM) written to {path}")
        return 0
    from k3batch.model.tiny import make_tiny

    path = make_tiny(args.dir, null_embedding=not args.no_null_embedding, overwrite=True)
    print(f"tiny Kandinsky 3 checkpoint (diffusers layout) written to {path}")
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
        "make-tiny", help="write a tiny random-weight Kandinsky 3 checkpoint (or LLM: --llm)"
    )
    tiny.add_argument("dir", help="directory to write (diffusers layout)")
    tiny.add_argument(
        "--no-null-embedding",
        action="store_true",
        help="leave out unet/null_embedding.safetensors, like kandinsky-community/kandinsky-3",
    )
    tiny.add_argument(
        "--llm",
        action="store_true",
        help="write a tiny random Mistral LLM instead (for the beautify tests and demo)",
    )
    tiny.set_defaults(func=_make_tiny)

    template = sub.add_parser(
        "chat-template",
        help="print the Kandinsky 3.1 beautification chat template (for vllm serve --chat-template)",
    )
    template.set_defaults(func=_chat_template)

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
