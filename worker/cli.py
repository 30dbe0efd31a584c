"""`sidecar-executor serve`: parse flags, load settings, run the service until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import pydantic
import yaml

from worker.app import Service
from worker.config import Settings, load_settings

log = logging.getLogger("sidecar_executor")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar-executor")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve REAPI v2 (CAS, action cache, execution)")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8980)")
    serve.add_argument("--data-dir", type=Path, help="where blobs, results and exec roots live")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--log-level", default="INFO")
    return parser


def _describe(error: pydantic.ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(settings)"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.listen is not None:
        overrides["server"] = {"listen": args.listen}
    return load_settings(args.config, **overrides)


async def _serve(settings: Settings) -> None:
    service = Service(settings)
    await service.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await service.stop()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from_args(args)
    except pydantic.ValidationError as error:
        print(f"sidecar-executor: invalid configuration:\n{_describe(error)}", file=sys.stderr)  # noqa: T201
        return 2
    except (FileNotFoundError, yaml.YAMLError) as error:
        print(f"sidecar-executor: cannot read configuration: {error}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        asyncio.run(_serve(settings))
    except OSError as error:
        print(f"sidecar-executor: {error}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
