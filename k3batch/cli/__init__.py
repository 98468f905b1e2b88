"""`k3batch` command line: run a job, report on it, build tiny models, show the config.

`parser` builds the argument parser (every sub-command and its help), `commands` holds what
each sub-command does; `main` is the `k3batch` entry point."""

from __future__ import annotations

import sys


def build_parser():
    from k3batch.cli.parser import build_parser

    return build_parser()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 every row accounted for; 1 the job stopped part-way or its accounting
    failed; 2 a bad config, input or environment, found before any work."""
    from k3batch.config import ConfigError
    from k3batch.job.failures import JobFailed
    from k3batch.ray_start.connect import quiet_console

    quiet_console()  # before any command imports tqdm (pre-flight builds tiny sets)
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
