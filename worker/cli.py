"""`sidecar-executor SUBCOMMAND ...`: the subcommands live in worker/commands/, one module each."""

from __future__ import annotations

import argparse
import logging
import sys

from worker.commands import cas, operations, pools, serve, worker

SUBCOMMANDS = [serve, worker, pools, operations, cas]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar-executor")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
