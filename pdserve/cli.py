"""The `pdserve` command: one entry point, a subcommand per way of running.

Subcommands import their modules lazily, so `pdserve --help` is instant and a stage only loads
what it runs (the worker needs torch; the gateway does not).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="pdserve: LLM serving with prefill/decode disaggregation"
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from pdserve import generate_command, launcher, probe_command, stage_commands

    generate_command.add_parser(sub)
    launcher.add_parser(sub)
    stage_commands.add_parsers(sub)
    probe_command.add_parser(sub)
    from pdserve.bench import command as bench_command

    bench_command.add_parser(sub)
    from pdserve.sweep import command as sweep_command

    sweep_command.add_parser(sub)
    from pdserve.chaos import command as chaos_command

    chaos_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
