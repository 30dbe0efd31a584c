"""`sidecar-executor worker --scheduler grpc://HOST:PORT`: the same executor and pools as `serve`,
but the work comes as leases from a Remote Workers API scheduler (BuildGrid), until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

import pydantic

from worker.bots.bot import Bot
from worker.bots.offer import extra_property_keys
from worker.bots.scheduler import SchedulerAddress, parse_scheduler
from worker.commands.common import (
    ConfigError,
    add_settings_flags,
    describe,
    fail,
    settings_from_args,
)
from worker.config import Settings

log = logging.getLogger("sidecar_executor")


def register(commands: Any) -> None:
    worker = commands.add_parser(
        "worker", help="take actions as leases from a Remote Workers API scheduler (BuildGrid)"
    )
    worker.add_argument(
        "--scheduler", help="grpc://HOST:PORT or grpcs://HOST:PORT (default: bot.scheduler)"
    )
    worker.add_argument("--instance", help="the scheduler's instance name (default: bot.instance)")
    worker.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also offer this property to the scheduler (repeatable; adds to bot.properties)",
    )
    add_settings_flags(worker)
    worker.set_defaults(run=run)


def settings_for(args: argparse.Namespace) -> tuple[Settings, SchedulerAddress]:
    settings = settings_from_args(args)
    bot = settings.bot.model_dump()
    if args.scheduler is not None:
        bot["scheduler"] = args.scheduler
    if args.instance is not None:
        bot["instance"] = args.instance
    bot["properties"] = [*bot["properties"], *args.property]
    try:
        settings = settings.model_copy(update={"bot": type(settings.bot).model_validate(bot)})
    except pydantic.ValidationError as error:
        raise ConfigError(f"invalid configuration:\n{describe(error)}") from error
    if not settings.execution.enabled:
        raise ConfigError("worker mode runs actions: execution.enabled must not be false")
    if not settings.bot.scheduler:
        raise ConfigError("worker needs --scheduler grpc://HOST:PORT (or bot.scheduler)")
    try:
        scheduler = parse_scheduler(settings.bot.scheduler)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    # Actions may carry the keys this worker offers; the executor must accept them.
    extra = extra_property_keys(settings)
    ignored = sorted({*settings.execution.ignored_properties, *extra})
    execution = settings.execution.model_copy(update={"ignored_properties": ignored})
    return settings.model_copy(update={"execution": execution}), scheduler


async def _work(settings: Settings, scheduler: SchedulerAddress) -> None:
    bot = Bot(settings, scheduler)
    try:
        await bot.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, bot.stop)
        await bot.run()
        log.info("stopping")
    finally:
        await bot.close()
    log.info("stopped")


def run(args: argparse.Namespace) -> int:
    try:
        settings, scheduler = settings_for(args)
    except ConfigError as error:
        return fail(str(error))
    try:
        asyncio.run(_work(settings, scheduler))
    except (OSError, ValueError) as error:
        return fail(str(error), code=1)
    return 0
