"""Waits for detached execs to end: the daemon's event stream first, polling as a fallback."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

import anyio

from worker.runtime.protocol import ContainerGone, ContainerRuntime, ContainerRuntimeError

# The exit code an exec reports when its container is removed under it (128 + SIGKILL).
KILLED_WITH_CONTAINER = 137

log = logging.getLogger(__name__)

# Exits seen before anyone waited for them (the exec may end before start_exec returns).
_EARLY_EXITS_KEPT = 10_000


class ExecWaiter:
    """One thread follows `exec_die` events for the whole process and resolves waiters.

    If the stream breaks (daemon restart) the thread reconnects with backoff, and
    every waiter keeps polling the exec's state, so no exit is missed for long.
    """

    def __init__(self, runtime: ContainerRuntime, poll_interval_s: float = 1.0) -> None:
        self._runtime = runtime
        self._poll_interval_s = poll_interval_s
        self._waiting: dict[str, asyncio.Future[int]] = {}
        self._early: OrderedDict[str, int] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._follow, name="exec-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _follow(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._runtime.wait_exec_events(self._on_exit)
            except ContainerRuntimeError as error:
                if self._stopping.is_set():
                    return
                log.warning("Docker event stream lost (%s); reconnecting", error)
            if time.monotonic() - started > 10:
                backoff = 0.1
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_exit(self, exec_id: str, exit_code: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._resolve, exec_id, exit_code)

    def _resolve(self, exec_id: str, exit_code: int) -> None:
        future = self._waiting.pop(exec_id, None)
        if future is not None:
            if not future.done():
                future.set_result(exit_code)
            return
        self._early[exec_id] = exit_code
        while len(self._early) > _EARLY_EXITS_KEPT:
            self._early.popitem(last=False)

    async def wait(self, exec_id: str) -> int:
        """The exit code of a detached exec, once it has ended."""
        if exec_id in self._early:
            return self._early.pop(exec_id)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[exec_id] = future
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(future), self._poll_interval_s)
                except TimeoutError:
                    try:
                        code = await anyio.to_thread.run_sync(self._runtime.exec_exit_code, exec_id)
                    except ContainerGone:
                        # The daemon forgets an exec with its container: it was killed with
                        # it (the caller must not take this for an exec that never started).
                        return KILLED_WITH_CONTAINER
                    if code is not None:
                        return code
        finally:
            self._waiting.pop(exec_id, None)
