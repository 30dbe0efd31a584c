"""Wiring of `sidecar-executor worker`: the local disk CAS and the execution side exactly as
`serve` builds them, a channel to the scheduler, and the session loop that feeds them."""

from __future__ import annotations

import asyncio
import logging
import socket

from worker.app import open_storage
from worker.bots.health import HealthPort
from worker.bots.leases import LeaseRunner
from worker.bots.offer import build_offer
from worker.bots.remote_cas import RemoteCas
from worker.bots.scheduler import SchedulerAddress, open_channel
from worker.bots.session import BotLoop
from worker.cas import io_threads
from worker.config import Settings
from worker.execution.wiring import ExecutionSide
from worker.identity import claim_data_dir

log = logging.getLogger(__name__)

STATUS_FILE = "bot-status.json"


def default_bot_id(worker_id: str) -> str:
    """Stable per data directory (the worker id lives there), so a restarted worker replaces
    its own earlier session at the scheduler; the same on every host that reuses the disk."""
    return f"sidecar-executor-{worker_id}"


class Bot:
    """Call start(), then run() until stop(); close() afterwards."""

    def __init__(self, settings: Settings, scheduler: SchedulerAddress) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.worker_name = settings.server.worker_name or socket.gethostname()
        self.identity = claim_data_dir(settings.data_dir)
        self.bot_id = settings.bot.bot_id or default_bot_id(self.identity.worker_id)
        self.offer = build_offer(settings, self.worker_name)
        try:
            self.storage = open_storage(settings)
            self.execution = ExecutionSide(
                settings,
                self.worker_name,
                self.identity.worker_id,
                self.storage.blobs,
                self.storage.action_cache,
            )
        except BaseException:
            self.identity.release()
            raise
        self.health = HealthPort(settings.server.listen)
        if settings.server.health_listen is not None:
            log.warning(
                "server.health_listen is for `serve`; in worker mode health is on "
                "server.listen (%s), in plain text",
                settings.server.listen,
            )
        self.channel = open_channel(scheduler, settings.bot.root_certificates)
        self.remote = RemoteCas(self.channel, settings.bot.instance, self.storage.blobs)
        self.loop = BotLoop(
            self.channel,
            self.bot_id,
            self.offer,
            LeaseRunner(
                self.storage.blobs,
                self.remote,
                self.execution.executor,
                settings.execution,
                self.worker_name,
            ),
            settings.bot,
            grace_s=settings.server.shutdown_grace_s,
            status_file=settings.data_dir / STATUS_FILE,
            prepare=self.remote.negotiate,
        )

    async def start(self) -> None:
        """Starts the health port (not ready), then the execution side: the Docker daemon is
        waited for and sidecars left over by an earlier run of this data directory are
        removed before any session exists; then health says ready."""
        await self.health.start()
        await self.execution.start()
        await self.health.ready(True)
        log.info(
            "bot %s for %s (instance %r) offers: %s",
            self.bot_id,
            self.scheduler,
            self.settings.bot.instance,
            self.offer.describe(),
        )

    async def run(self) -> None:
        await self.loop.run()

    def stop(self) -> None:
        self.loop.stop()
        asyncio.ensure_future(self.health.ready(False))

    async def close(self) -> None:
        await self.health.stop()
        await self.execution.close()
        await self.channel.close(None)
        await io_threads.run(self.storage.uploads.close)  # waits on appends in flight
        await io_threads.run(self.storage.blobs.close)  # journalled blobs become files
        self.identity.release()
