"""`sidecar-executor serve`: the whole service in one process until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Any

from worker.app import Service
from worker.commands.common import ConfigError, add_settings_flags, fail, settings_from_args
from worker.config import Settings

log = logging.getLogger("sidecar_executor")


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve REAPI v2 (CAS, action cache, execution)")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8980)")
    add_settings_flags(serve)
    serve.set_defaults(run=run)


def settings_for(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.listen is not None:
        overrides["server"] = {"listen": args.listen}
    return settings_from_args(args, **overrides)


async def _serve(settings: Settings, args: argparse.Namespace | None = None) -> None:
    service = Service(
        settings,
        reload_settings=(lambda: settings_for(args)) if args is not None else None,
        config_file=args.config if args is not None else None,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    if service.reloader is not None:  # SIGHUP: reload the configuration's pool settings
        loop.add_signal_handler(signal.SIGHUP, service.reloader.request)
    # Start-up may wait long for the Docker daemon: a signal meanwhile ends it cleanly.
    starting = asyncio.create_task(service.start())
    signalled = asyncio.create_task(stopping.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped before execution was ready")
        return
    signalled.cancel()
    starting.result()
    await stopping.wait()
    log.info("stopping")
    await service.stop()
    log.info("stopped")


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_for(args)
    except ConfigError as error:
        return fail(str(error))
    try:
        asyncio.run(_serve(settings, args))
    except OSError as error:
        return fail(str(error), code=1)
    return 0
