"""Runs the real service on a loopback port in a background thread, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from worker.app import Service
from worker.config import Settings


class RunningService:
    """A started Service on its own event loop thread, and a client channel to it."""

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.service: Service = self.call(self._create(settings))
        self.address = f"127.0.0.1:{self.service.port}"
        self.channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )

    @staticmethod
    async def _create(settings: Settings) -> Service:
        service = Service(settings)
        await service.start()
        return service

    def call(self, coroutine: Any) -> Any:
        """Runs a coroutine on the service's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        self.channel.close()
        self.call(self.service.stop(grace_s=1))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextmanager
def running_service(settings: Settings) -> Iterator[RunningService]:
    running = RunningService(settings)
    try:
        yield running
    finally:
        running.close()
