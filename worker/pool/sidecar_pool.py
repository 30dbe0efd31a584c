"""One pool: lease a warm sidecar, return it, recycle it, keep min_idle warm, shed idle ones."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.config import PoolSettings
from worker.errors import Unavailable
from worker.pool.events import NoEvents, PoolEvents

log = logging.getLogger(__name__)


class PoolDrained(Unavailable):
    """The pool is drained by an operator (when_drained: refuse); retrying at once is futile."""


@dataclass(frozen=True)
class PoolKey:
    """Sidecars are interchangeable only if all of these match."""

    image_id: str
    user: str
    network: str
    cpus: float | None
    memory_bytes: int | None
    pids_limit: int | None
    # The image's VOLUME paths: each sidecar gets writable volumes there that the runner's
    # scrub cannot reset to the image's content, so such sidecars serve one action each.
    volumes: tuple[str, ...] = ()
    dispatch: str = "exec"

    @property
    def uid(self) -> int:
        return int(self.user.partition(":")[0])

    @property
    def gid(self) -> int:
        return int(self.user.partition(":")[2])

    @property
    def runs_as_root(self) -> bool:
        """Root's uid or group: such a sidecar is used once and gets copies of its inputs."""
        return self.uid == 0 or self.gid == 0

    @property
    def single_use(self) -> bool:
        """A sidecar of this key serves one action and is destroyed: nothing proves that
        whatever an action changed in it is undone."""
        return self.runs_as_root or bool(self.volumes)


@dataclass(eq=False)
class Sidecar:
    container_id: str
    key: PoolKey
    created_at: float
    last_used: float
    actions_started: int = 0
    active: int = 0
    retired: bool = False
    removed: bool = False  # its container is gone (counted out of the worker's total)
    # The only host directory this sidecar mounts (at the same path); actions are staged here.
    directory: Path | None = None
    # Dispatch `agent`: the agent's socket on the host, and the secret it greets with.
    agent_socket: Path | None = None
    agent_secret: str = ""
    leased_at: float = 0.0

    @property
    def short_id(self) -> str:
        return self.container_id[:12]


CreateSidecar = Callable[[PoolKey], Awaitable[Sidecar]]
DestroySidecar = Callable[[Sidecar], Coroutine[Any, Any, None]]

# How many recent lease-to-release times a pool keeps for its median.
HELD_SAMPLES = 256


@dataclass
class PoolStats:
    created: int = 0
    cold_starts: int = 0  # created while a lease waited for it
    destroyed: int = 0
    leases: int = 0
    waits: int = 0  # leases that found the pool at max_sidecars and waited
    served: int = 0  # leases returned
    retired: Counter[str] = field(default_factory=Counter)  # by reason (pool.events)
    held_s: deque[float] = field(default_factory=lambda: deque(maxlen=HELD_SAMPLES))

    @property
    def held_p50_s(self) -> float | None:
        return statistics.median(self.held_s) if self.held_s else None


class SidecarPool:
    """Hands out sidecars of one key, at most `actions_per_sidecar` actions in each at once.

    A sidecar is retired (destroyed once idle) when it was used for
    `max_actions_per_sidecar` actions, is older than `max_age_s`, or was returned
    as not reusable (timeout, OOM kill, stray processes, lost keep-alive).

    A pool of single-use sidecars (root actions, images with VOLUMEs) runs one action
    per sidecar whatever the settings say, and never reuses one: a root action can
    change anything in its container, and a volume keeps what an action wrote there.

    Operators may change its settings while it runs (they apply at the next upkeep), drain
    it (no new leases; running actions finish, then its sidecars go) or recycle it (every
    sidecar is replaced once its actions are done). With `scale_up_wait_s` set, a lease
    that waited longer than that makes the pool keep more sidecars warm (`boost`), which
    idle_ttl_s takes back.
    """

    def __init__(
        self,
        key: PoolKey,
        settings: PoolSettings,
        create: CreateSidecar,
        destroy: DestroySidecar,
        clock: Callable[[], float] = time.monotonic,
        reference: str = "",
        events: PoolEvents | None = None,
        wake_upkeep: Callable[[], None] | None = None,
    ) -> None:
        self.key = key
        self.settings = settings
        # The image as clients and the configuration name it (the key has only its ID).
        self.reference = reference or key.image_id
        self._create = create
        self._destroy = destroy
        self._clock = clock
        self._events: PoolEvents = events or NoEvents()
        self._wake_upkeep = wake_upkeep or (lambda: None)
        self._sidecars: list[Sidecar] = []
        self._creating = 0
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Task[None]] = set()
        self._waiting = 0
        self.draining = False
        # A newer image of the same reference serves new actions: this pool only winds down.
        self.superseded = False
        # Sidecars kept warm above min_idle because leases waited (autoscaling).
        self.boost = 0
        self.stats = PoolStats()

    # Labels for observers (pool.events.PoolLabels).
    @property
    def image_id(self) -> str:
        return self.key.image_id

    @property
    def user(self) -> str:
        return self.key.user

    @property
    def network(self) -> str:
        return self.key.network

    @property
    def actions_per_sidecar(self) -> int:
        return 1 if self.key.single_use else self.settings.actions_per_sidecar

    @property
    def sidecars(self) -> list[Sidecar]:
        return list(self._sidecars)

    @property
    def is_empty(self) -> bool:
        """No sidecars, none being made and no lease waiting: safe to forget."""
        return not self._sidecars and self._creating == 0 and self._waiting == 0

    @property
    def waiting(self) -> int:
        """Leases waiting for a sidecar (at max_sidecars, or while the pool is drained)."""
        return self._waiting

    def counts(self) -> dict[str, int]:
        """Sidecars by state: idle, busy, starting, retiring (retired, still running actions
        or being removed)."""
        retiring = len(self._background) + sum(1 for s in self._sidecars if s.retired)
        return {
            "idle": sum(1 for s in self._sidecars if s.active == 0 and not s.retired),
            "busy": sum(1 for s in self._sidecars if s.active > 0 and not s.retired),
            "starting": self._creating,
            "retiring": retiring,
        }

    def _worn_out(self, sidecar: Sidecar) -> str | None:
        """Why the sidecar may serve no more actions (a retire reason), or None."""
        if sidecar.actions_started >= self.settings.max_actions_per_sidecar:
            return "uses"
        if self._clock() - sidecar.created_at >= self.settings.max_age_s:
            return "age"
        return None

    def _pick(self) -> Sidecar | None:
        usable = [
            s
            for s in self._sidecars
            if not s.retired and s.active < self.actions_per_sidecar and not self._worn_out(s)
        ]
        if not usable:
            return None
        # Least loaded first, then the most recently used (its caches are warm).
        return min(usable, key=lambda s: (s.active, -s.last_used))

    def _refuse_if_drained(self) -> None:
        if self.draining and self.settings.when_drained == "refuse":
            raise PoolDrained(
                f"the sidecar pool of {self.reference} is drained by an operator; retry later"
            )

    async def lease(self) -> Sidecar:
        """A sidecar with room for one more action. Raises Unavailable if the pool is drained
        (when_drained: refuse), or waits until the drain is lifted (when_drained: wait)."""
        started = self._clock()
        async with self._changed:
            while True:
                self._refuse_if_drained()
                sidecar = None if self.draining else self._pick()
                if sidecar is not None:
                    sidecar.active += 1
                    sidecar.actions_started += 1
                    sidecar.leased_at = self._clock()
                    self.stats.leases += 1
                    self._waited(started)
                    return sidecar
                # Idle sidecars that may not serve again make room at once; waiting for
                # upkeep to remove them would wait forever at max_sidecars.
                for worn in [s for s in self._sidecars if s.active == 0]:
                    reason = self._worn_out(worn)
                    if reason is not None:
                        self._remove(worn, reason)
                if (
                    not self.draining
                    and len(self._sidecars) + self._creating < self.settings.max_sidecars
                ):
                    self._creating += 1
                    break
                self.stats.waits += 1
                self._waiting += 1
                try:
                    await self._changed.wait()
                finally:
                    self._waiting -= 1
        try:
            sidecar = await self._create(self.key)
        except BaseException:
            async with self._changed:
                self._creating -= 1
                self._changed.notify_all()
            raise
        async with self._changed:
            self._creating -= 1
            self.stats.created += 1
            self.stats.cold_starts += 1
            self.stats.leases += 1
            sidecar.active = 1
            sidecar.actions_started = 1
            sidecar.leased_at = self._clock()
            self._sidecars.append(sidecar)
            self._changed.notify_all()
        self._events.sidecar_created(self, cold=True)
        self._waited(started)
        return sidecar

    def _waited(self, started: float) -> None:
        """Records a lease's wait; one longer than scale_up_wait_s asks for more warm
        sidecars: one for this lease and one for each lease still waiting."""
        waited = self._clock() - started
        self._events.lease_waited(self, waited)
        threshold = self.settings.scale_up_wait_s
        if threshold is None or waited <= threshold or self.draining:
            return
        room = self.settings.max_sidecars - self.settings.min_idle
        boost = min(self.boost + 1 + self._waiting, max(room, 0))
        if boost > self.boost:
            log.info(
                "pool of %s: a lease waited %.2f s; keeping %d more sidecars warm",
                self.reference,
                waited,
                boost - self.boost,
            )
            self.boost = boost
            self._wake_upkeep()

    async def release(self, sidecar: Sidecar, reusable: bool, reason: str = "unclean") -> None:
        """Returns a sidecar after an action; one that may not serve again (`reason` says why
        when not `reusable`) is destroyed before this returns (when no other action still
        runs in it)."""
        async with self._changed:
            sidecar.active -= 1
            sidecar.last_used = self._clock()
            self.stats.served += 1
            self.stats.held_s.append(sidecar.last_used - sidecar.leased_at)
            retire_reason: str | None = None
            if not reusable:
                retire_reason = reason
            elif (worn := self._worn_out(sidecar)) is not None:
                retire_reason = worn
            elif self.draining or self.superseded or self._over_max():
                retire_reason = "operator"
            if retire_reason is not None and not sidecar.retired:
                sidecar.retired = True
                self._count_retired(retire_reason)
            destroy_now = sidecar.retired and sidecar.active == 0 and sidecar in self._sidecars
            if destroy_now:
                self._sidecars.remove(sidecar)
                self.stats.destroyed += 1
            self._changed.notify_all()
        self._events.sidecar_held(self, sidecar.last_used - sidecar.leased_at)
        if destroy_now:
            await self._destroy(sidecar)

    def _over_max(self) -> bool:
        return len([s for s in self._sidecars if not s.retired]) > self.settings.max_sidecars

    def _count_retired(self, reason: str) -> None:
        self.stats.retired[reason] += 1
        self._events.sidecar_retired(self, reason)

    def _remove(self, sidecar: Sidecar, reason: str | None) -> None:
        """Drops a sidecar from the pool and destroys it in the background."""
        if sidecar in self._sidecars:
            self._sidecars.remove(sidecar)
            self.stats.destroyed += 1
            if reason is not None and not sidecar.retired:
                self._count_retired(reason)
            sidecar.retired = True
            task = asyncio.create_task(self._destroy(sidecar))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            self._changed.notify_all()

    def _retire(self, sidecar: Sidecar, reason: str) -> None:
        """Retires a sidecar: an idle one goes now, a busy one when its actions are done."""
        if sidecar.active == 0:
            self._remove(sidecar, reason)
        elif not sidecar.retired:
            sidecar.retired = True
            self._count_retired(reason)

    # ------------------------------------------------------------ operators

    async def update(self, settings: PoolSettings) -> None:
        """New settings (a scale or a reload); upkeep pre-warms or sheds to them."""
        async with self._changed:
            self.settings = settings
            self.boost = min(self.boost, max(settings.max_sidecars - settings.min_idle, 0))
            self._changed.notify_all()  # a lease waiting at the old max may go ahead

    async def recycle(self) -> int:
        """Replaces every sidecar gracefully: idle ones go now, busy ones once their actions
        are done; upkeep pre-warms new ones. Returns how many were retired."""
        async with self._changed:
            current = [s for s in self._sidecars if not s.retired]
            for sidecar in current:
                self._retire(sidecar, "operator")
            self._changed.notify_all()
        return len(current)

    async def drain(self) -> None:
        """No new leases; idle sidecars go now, busy ones when their actions are done."""
        async with self._changed:
            self.draining = True
            self.boost = 0
            for sidecar in [s for s in self._sidecars if not s.retired]:
                self._retire(sidecar, "operator")
            self._changed.notify_all()  # waiting leases are refused (or keep waiting)

    async def resume(self) -> None:
        async with self._changed:
            self.draining = False
            self._changed.notify_all()

    async def supersede(self) -> None:
        """A newer image of this pool's reference takes over: this pool pre-warms no more,
        its sidecars go once idle, and upkeep forgets it when it is empty."""
        async with self._changed:
            self.superseded = True
            self.boost = 0
            for sidecar in [s for s in self._sidecars if not s.retired]:
                self._retire(sidecar, "operator")
            self._changed.notify_all()

    @property
    def warm_target(self) -> int:
        """Idle sidecars upkeep keeps: min_idle plus the autoscaling boost, none when
        drained or superseded."""
        if self.draining or self.superseded:
            return 0
        return self.settings.min_idle + self.boost

    # --------------------------------------------------------------- upkeep

    async def maintain(
        self, is_alive: Callable[[Sidecar], Awaitable[bool]], may_create: int | None = None
    ) -> None:
        """Sheds idle sidecars past idle_ttl_s (keeping the warm target), drops dead or
        worn-out idle ones and those above max_sidecars, and creates sidecars until the warm
        target is idle (at most `may_create` of them: the worker's room under its total, so
        pre-warming never waits or evicts)."""
        now = self._clock()
        async with self._changed:
            idle = [s for s in self._sidecars if s.active == 0]
        dead = [s for s in idle if not await is_alive(s)]
        async with self._changed:
            for sidecar in dead:
                if sidecar.active == 0:
                    log.warning(
                        "sidecar %s of %s is not running; replacing it",
                        sidecar.short_id,
                        self.key.image_id[:19],
                    )
                    self._remove(sidecar, "dead")
            idle = sorted((s for s in self._sidecars if s.active == 0), key=lambda s: s.last_used)
            for sidecar in idle:
                reason = self._worn_out(sidecar)
                if reason is not None or sidecar.retired:
                    self._remove(sidecar, reason or "operator")
            idle = [s for s in idle if s in self._sidecars]
            # Above max_sidecars (lowered by an operator): idle ones go now, the oldest first.
            excess = len([s for s in self._sidecars if not s.retired]) - self.settings.max_sidecars
            for sidecar in idle[: max(excess, 0)]:
                self._remove(sidecar, "operator")
            idle = [s for s in idle if s in self._sidecars]
            surplus = len(idle) - self.settings.min_idle
            for sidecar in idle:
                if surplus <= 0:
                    break
                if now - sidecar.last_used >= self.settings.idle_ttl_s:
                    self._remove(sidecar, "idle_ttl")
                    surplus -= 1
                    self.boost = max(self.boost - 1, 0)
            live = [s for s in self._sidecars if not s.retired]
            # Sidecars being made count as warm already: two upkeeps at once (an interval's
            # and a woken one) must not both make the same missing ones.
            missing = self.warm_target - len([s for s in live if s.active == 0]) - self._creating
            missing = min(missing, self.settings.max_sidecars - len(live) - self._creating)
            if may_create is not None:
                missing = min(missing, may_create)
            self._creating += max(missing, 0)
        for _ in range(max(missing, 0)):
            try:
                sidecar = await self._create(self.key)
            except Exception as error:
                log.warning("could not pre-warm a sidecar of %s: %s", self.reference, error)
                async with self._changed:
                    self._creating -= 1
                    self._changed.notify_all()  # a lease waiting for room may go ahead now
                continue
            async with self._changed:
                self._creating -= 1
                self.stats.created += 1
                self._sidecars.append(sidecar)
                self._changed.notify_all()
            self._events.sidecar_created(self, cold=False)

    def idle(self) -> list[Sidecar]:
        return [s for s in self._sidecars if s.active == 0]

    async def evict(self, sidecar: Sidecar) -> bool:
        """Destroys an idle sidecar to make room for another pool's; False if it was leased
        or removed meanwhile."""
        async with self._changed:
            if sidecar not in self._sidecars or sidecar.active:
                return False
            self._sidecars.remove(sidecar)
            self.stats.destroyed += 1
            if not sidecar.retired:
                self._count_retired("evicted")
            self._changed.notify_all()
        await self._destroy(sidecar)
        return True

    async def close(self) -> None:
        async with self._changed:
            for sidecar in list(self._sidecars):
                self._remove(sidecar, None)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
