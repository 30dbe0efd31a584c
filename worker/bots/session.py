"""The bot's session with the scheduler: one loop of CreateBotSession, then UpdateBotSession again
and again, which starts the leases the scheduler hands over and reports the finished ones.

The rules it keeps (see docs in README "Scale-out"):
- every call echoes the session `version` the scheduler last returned (BuildGrid counts with it);
- a finished lease is reported at once: an UpdateBotSession long poll in flight is abandoned and
  a new call made (the scheduler treats a repeated report of a completed lease as done already);
- while leases run, the session is kept alive with a call at least every `bot.keepalive_s`
  (and well within the session's expire_time);
- an ACTIVE lease the scheduler's reply leaves out (or marks CANCELLED) was taken back: it is
  cancelled here (processes killed, sidecar handled as for any cancel) and never reported;
- at most `capacity` leases run; one beyond that, or one offered while stopping, is handed back
  at once as UNAVAILABLE, which makes the scheduler queue it again;
- stop(): status BOT_TERMINATING (no new leases), running leases get the grace period, those
  still running then end UNAVAILABLE (requeued); the loop ends once all are reported;
- a scheduler that cannot be reached is retried with growing pauses (up to `bot.retry_max_s`),
  never given up on; a session the scheduler no longer knows is replaced by a new one, after
  the leases of the old one are cancelled here (the scheduler has requeued them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from worker.bots.leases import UNAVAILABLE
from worker.bots.offer import Offer
from worker.bots.rwapi import bots_grpc, bots_pb2
from worker.config import BotSettings
from worker.errors import Cancelled
from worker.reapi import re_pb2, status_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

BotStatus = bots_pb2.BotStatus
LeaseState = bots_pb2.LeaseState

# Errors after which the same session is simply tried again; any other error means the
# scheduler no longer takes this session, and a new one is made.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}
# A call answered sooner than this was no long poll: the next one waits a little.
QUICK_ANSWER_S = 1.0
# The pause after such a call while the bot has room for more leases.
ROOM_PAUSE_S = 1.0
# After the grace period, how long a stopping bot still tries to report to an absent scheduler.
GOODBYE_S = 10.0
# Lease ids become part of a metadata key; anything else is not sent as one.
_METADATA_SAFE = re.compile(r"[a-z0-9._-]{1,200}")


class RunsLeases(Protocol):
    """What the loop needs of a lease runner (worker.bots.leases.LeaseRunner)."""

    async def run(
        self,
        lease: bots_pb2.Lease,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
    ) -> bots_pb2.Lease: ...


class _Interrupted(Exception):
    """A call was abandoned because the bot has news to report (or is stopping)."""


@dataclass
class _Held:
    lease_id: str
    metadata: re_pb2.ExecutedActionMetadata = field(default_factory=re_pb2.ExecutedActionMetadata)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    report_on_cancel: bool = False
    task: asyncio.Task[None] | None = None


class Backoff:
    def __init__(self, max_s: float, first_s: float = 0.5) -> None:
        self._first = first_s
        self._max = max_s
        self._next = first_s

    def reset(self) -> None:
        self._next = self._first

    def take(self) -> float:
        pause = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self._max)
        return min(pause, self._max)


class BotLoop:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        bot_id: str,
        offer: Offer,
        runner: RunsLeases,
        settings: BotSettings,
        grace_s: float,
        status_file: Path | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`prepare` runs before the first session is made (until it succeeds)."""
        self._stub = bots_grpc.BotsStub(channel)
        self._bot_id = bot_id
        self._offer = offer
        self._worker = offer.to_worker()
        self._runner = runner
        self._settings = settings
        self._grace_s = grace_s
        self._status_file = status_file
        self._prepare = prepare
        self._name = ""
        self._version = ""
        self._expire_at = 0.0
        self._running: dict[str, _Held] = {}
        self._cancelling: dict[str, _Held] = {}
        self._finished: dict[str, tuple[bots_pb2.Lease, re_pb2.ExecutedActionMetadata]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._told_terminating = False
        self._quick_idle = False
        self._stop_deadline = 0.0
        self._grace_timer: asyncio.TimerHandle | None = None
        self.completed = 0
        self.started = 0
        self.sessions = 0

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Stops taking leases; running ones get the grace period, then end UNAVAILABLE."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = time.monotonic() + self._grace_s + GOODBYE_S
        log.info(
            "stopping: no new leases; %d running get %g s to finish",
            len(self._running),
            self._grace_s,
        )
        self._grace_timer = asyncio.get_running_loop().call_later(self._grace_s, self._give_up)
        self._wake.set()

    def _give_up(self) -> None:
        for held in self._running.values():
            log.info("lease %s did not finish in the grace period; handing it back", held.lease_id)
            held.report_on_cancel = True
            held.cancelled.set()

    async def run(self) -> None:
        """Runs until stop() has been called and every lease is reported (or the scheduler
        stayed away past the grace period)."""
        backoff = Backoff(self._settings.retry_max_s)
        try:
            while not self._done():
                if not self._name:
                    if self._stopping:
                        break
                    await self._step(self._create, backoff)
                else:
                    await self._step(self._update, backoff)
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            await self._wait_for_leases()
            self._write_status("stopped")

    def _done(self) -> bool:
        if not self._stopping:
            return False
        if time.monotonic() > self._stop_deadline:
            log.warning("the scheduler could not be told about the last leases; stopping anyway")
            return True
        return not self._running and not self._finished and self._told_terminating

    async def _step(self, call: Callable[[], Awaitable[None]], backoff: Backoff) -> None:
        try:
            await call()
            backoff.reset()
        except _Interrupted:
            pass
        except grpc.aio.AioRpcError as error:
            if error.code() not in TRANSIENT:
                log.warning(
                    "the scheduler refused the session (%s: %s); starting a new one",
                    error.code().name,
                    error.details(),
                )
                self._lose_session()
            elif self._name and time.monotonic() > self._expire_at:
                log.warning("the session expired while the scheduler was away; starting a new one")
                self._lose_session()
            pause = backoff.take()
            log.info(
                "scheduler unreachable or refusing (%s); trying again in %.1f s",
                error.code().name,
                pause,
            )
            self._write_status("reconnecting")
            await self._pause(pause)

    # -------------------------------------------------------------------- calls

    async def _create(self) -> None:
        session = bots_pb2.BotSession(bot_id=self._bot_id, status=BotStatus.OK, worker=self._worker)
        request = bots_pb2.CreateBotSessionRequest(
            parent=self._settings.instance, bot_session=session
        )
        self._told_terminating = False
        self._write_status("joining")
        if self._prepare is not None:
            await self._interruptible(self._prepare())
            self._prepare = None
        response = await self._interruptible(
            self._stub.CreateBotSession(request, timeout=self._settings.poll_timeout_s)
        )
        self._name = response.name
        self.sessions += 1
        log.info("joined the scheduler as bot %s, session %s", self._bot_id, self._name)
        self._accept(response)

    async def _update(self) -> None:
        self._wake.clear()
        terminating = self._stopping
        session = bots_pb2.BotSession(
            name=self._name,
            bot_id=self._bot_id,
            status=BotStatus.BOT_TERMINATING if terminating else BotStatus.OK,
            worker=self._worker,
            version=self._version,
        )
        for lease_id in self._running:
            session.leases.add(id=lease_id, state=LeaseState.ACTIVE)
        reported = dict(self._finished)
        metadata: list[tuple[str, str | bytes]] = []
        for lease_id, (lease, executed) in reported.items():
            session.leases.append(lease)
            job = lease_id.rsplit("/", 1)[-1]
            if _METADATA_SAFE.fullmatch(job):
                metadata.append(
                    (f"partial-execution-metadata-{job}-bin", executed.SerializeToString())
                )
        request = bots_pb2.UpdateBotSessionRequest(name=self._name, bot_session=session)
        asked = time.monotonic()
        response = await self._interruptible(
            self._stub.UpdateBotSession(
                request, timeout=self._settings.poll_timeout_s, metadata=metadata
            )
        )
        for lease_id in reported:
            self._finished.pop(lease_id, None)
        self.completed += sum(
            1 for lease, _ in reported.values() if lease.status.code != UNAVAILABLE
        )
        self._told_terminating = terminating
        news = self._accept(response)
        quick = not news and time.monotonic() - asked < QUICK_ANSWER_S
        # An idle bot calls again at once: the scheduler long-polls it until work comes, and a
        # pause would only delay that work. A busy bot's calls come back at once when the
        # scheduler does not long-poll busy bots, so those are paced; so is an idle bot whose
        # calls keep coming back empty at once (no long poll at all), from the second one.
        paced = bool(self._running) or self._stopping or self._quick_idle
        self._quick_idle = quick and not self._running
        if quick and paced and not self._wake.is_set():
            await self._pause(self._quiet_pause())

    def _quiet_pause(self) -> float:
        """How long to wait before the next call when the last one came back at once."""
        room = len(self._running) < self._offer.capacity and not self._stopping
        pause = ROOM_PAUSE_S if room else self._settings.keepalive_s
        left = self._expire_at - time.monotonic()
        return max(0.05, min(pause, left / 3))

    async def _interruptible(self, call: Awaitable[T]) -> T:
        """Awaits a call unless the bot has news first (a finished lease, a stop): then the
        call is cancelled and _Interrupted raised."""
        task: asyncio.Future[T] = asyncio.ensure_future(call)
        waker: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        both: list[asyncio.Future[Any]] = [task, waker]
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task
        raise _Interrupted

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    # ------------------------------------------------------------------- leases

    def _accept(self, response: bots_pb2.BotSession) -> bool:
        """Takes in the scheduler's view of the session; True if leases arrived."""
        self._version = response.version
        if response.HasField("expire_time"):
            left = response.expire_time.ToDatetime().timestamp() - time.time()
            self._expire_at = time.monotonic() + left
        offered = {lease.id: lease for lease in response.leases}
        for lease_id, held in list(self._running.items()):
            lease = offered.get(lease_id)
            if lease is None or lease.state == LeaseState.CANCELLED:
                log.info("the scheduler took lease %s back; cancelling it", lease_id)
                self._cancel(held)
        news = False
        for lease in response.leases:
            known = (
                lease.id in self._running
                or lease.id in self._finished
                or lease.id in self._cancelling
            )
            if known or lease.state not in (LeaseState.PENDING, LeaseState.ACTIVE):
                continue
            news = True
            if self._stopping or len(self._running) >= self._offer.capacity:
                why = "the worker is stopping" if self._stopping else "the worker is full"
                self._finish(lease.id, _handed_back(lease.id, why), re_pb2.ExecutedActionMetadata())
            else:
                self._start(lease)
        self._write_status("stopping" if self._stopping else "running")
        return news

    def _start(self, lease: bots_pb2.Lease) -> None:
        held = _Held(lease.id)
        self._running[lease.id] = held
        self.started += 1
        log.info("lease %s: started", lease.id)
        held.task = asyncio.create_task(self._run_lease(lease, held))

    async def _run_lease(self, lease: bots_pb2.Lease, held: _Held) -> None:
        try:
            completed = await self._runner.run(lease, held.metadata, held.cancelled)
        except Cancelled:
            if held.report_on_cancel:
                self._finish(lease.id, _handed_back(lease.id, "the worker stopped"), held.metadata)
            else:
                log.info("lease %s: cancelled", lease.id)
            return
        finally:
            self._running.pop(lease.id, None)
            self._cancelling.pop(lease.id, None)
        log.info(
            "lease %s: finished (status %s)",
            lease.id,
            grpc.StatusCode.OK.name if completed.status.code == 0 else completed.status.code,
        )
        self._finish(lease.id, completed, held.metadata)

    def _finish(
        self, lease_id: str, lease: bots_pb2.Lease, metadata: re_pb2.ExecutedActionMetadata
    ) -> None:
        self._finished[lease_id] = (lease, metadata)
        self._wake.set()

    def _cancel(self, held: _Held) -> None:
        held.report_on_cancel = False
        held.cancelled.set()
        self._running.pop(held.lease_id, None)
        self._cancelling[held.lease_id] = held

    def _lose_session(self) -> None:
        for held in list(self._running.values()):
            self._cancel(held)
        self._finished.clear()
        self._name = ""
        self._version = ""

    async def _wait_for_leases(self) -> None:
        tasks = [
            held.task
            for held in (*self._running.values(), *self._cancelling.values())
            if held.task is not None
        ]
        for held in self._running.values():
            held.cancelled.set()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------- status

    def status(self, state: str) -> dict[str, Any]:
        return {
            "state": state,
            "bot_id": self._bot_id,
            "session": self._name,
            "offer": self._offer.as_dict(),
            "running": sorted(self._running),
            "leases_started": self.started,
            "leases_completed": self.completed,
            "sessions": self.sessions,
        }

    def _write_status(self, state: str) -> None:
        """The bot's state as JSON in the data directory, for people and tests to read."""
        if self._status_file is None:
            return
        staged = self._status_file.with_name(self._status_file.name + ".new")
        try:
            staged.write_text(json.dumps(self.status(state), indent=1) + "\n")
            os.replace(staged, self._status_file)
        except OSError as error:
            log.warning("could not write %s: %s", self._status_file, error)


def _handed_back(lease_id: str, why: str) -> bots_pb2.Lease:
    return bots_pb2.Lease(
        id=lease_id,
        state=LeaseState.COMPLETED,
        status=status_pb2.Status(code=UNAVAILABLE, message=f"{why}; run the action elsewhere"),
    )
