"""One pool: lease a warm sidecar, return it, recycle it, keep min_idle warm, shed idle ones."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import PoolSettings

log = logging.getLogger(__name__)


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

    @property
    def short_id(self) -> str:
        return self.container_id[:12]


CreateSidecar = Callable[[PoolKey], Awaitable[Sidecar]]
DestroySidecar = Callable[[Sidecar], Coroutine[Any, Any, None]]


@dataclass
class PoolStats:
    created: int = 0
    destroyed: int = 0
    leases: int = 0
    waits: int = 0


class SidecarPool:
    """Hands out sidecars of one key, at most `actions_per_sidecar` actions in each at once.

    A sidecar is retired (destroyed once idle) when it was used for
    `max_actions_per_sidecar` actions, is older than `max_age_s`, or was returned
    as not reusable (timeout, OOM kill, stray processes, lost keep-alive).

    A pool of single-use sidecars (root actions, images with VOLUMEs) runs one action
    per sidecar whatever the settings say, and never reuses one: a root action can
    change anything in its container, and a volume keeps what an action wrote there.
    """

    def __init__(
        self,
        key: PoolKey,
        settings: PoolSettings,
        create: CreateSidecar,
        destroy: DestroySidecar,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self.settings = settings
        self._create = create
        self._destroy = destroy
        self._clock = clock
        self._sidecars: list[Sidecar] = []
        self._creating = 0
        self._changed = asyncio.Condition()
        self._background: set[asyncio.Task[None]] = set()
        self._waiting = 0
        self.stats = PoolStats()

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

    def _worn_out(self, sidecar: Sidecar) -> bool:
        return (
            sidecar.actions_started >= self.settings.max_actions_per_sidecar
            or self._clock() - sidecar.created_at >= self.settings.max_age_s
        )

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

    async def lease(self) -> Sidecar:
        async with self._changed:
            while True:
                sidecar = self._pick()
                if sidecar is not None:
                    sidecar.active += 1
                    sidecar.actions_started += 1
                    self.stats.leases += 1
                    return sidecar
                # Idle sidecars that may not serve again make room at once; waiting for
                # upkeep to remove them would wait forever at max_sidecars.
                for worn in [s for s in self._sidecars if s.active == 0 and self._worn_out(s)]:
                    self._remove(worn)
                if len(self._sidecars) + self._creating < self.settings.max_sidecars:
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
            self.stats.leases += 1
            sidecar.active = 1
            sidecar.actions_started = 1
            self._sidecars.append(sidecar)
            self._changed.notify_all()
        return sidecar

    async def release(self, sidecar: Sidecar, reusable: bool) -> None:
        """Returns a sidecar after an action; one that may not serve again is destroyed before
        this returns (when no other action still runs in it)."""
        async with self._changed:
            sidecar.active -= 1
            sidecar.last_used = self._clock()
            if not reusable or self._worn_out(sidecar):
                sidecar.retired = True
            destroy_now = sidecar.retired and sidecar.active == 0 and sidecar in self._sidecars
            if destroy_now:
                self._sidecars.remove(sidecar)
                self.stats.destroyed += 1
            self._changed.notify_all()
        if destroy_now:
            await self._destroy(sidecar)

    def _remove(self, sidecar: Sidecar) -> None:
        """Drops a sidecar from the pool and destroys it in the background."""
        if sidecar in self._sidecars:
            self._sidecars.remove(sidecar)
            self.stats.destroyed += 1
            task = asyncio.create_task(self._destroy(sidecar))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            self._changed.notify_all()

    async def maintain(
        self, is_alive: Callable[[Sidecar], Awaitable[bool]], may_create: int | None = None
    ) -> None:
        """Sheds idle sidecars past idle_ttl_s (keeping min_idle), drops dead or worn-out idle
        ones, and creates sidecars until min_idle are idle (at most `may_create` of them: the
        worker's room under its total, so pre-warming never waits or evicts)."""
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
                    self._remove(sidecar)
            idle = sorted((s for s in self._sidecars if s.active == 0), key=lambda s: s.last_used)
            for sidecar in idle:
                if self._worn_out(sidecar):
                    self._remove(sidecar)
            idle = [s for s in idle if s in self._sidecars]
            surplus = len(idle) - self.settings.min_idle
            for sidecar in idle:
                if surplus <= 0:
                    break
                if now - sidecar.last_used >= self.settings.idle_ttl_s:
                    self._remove(sidecar)
                    surplus -= 1
            missing = self.settings.min_idle - len([s for s in self._sidecars if s.active == 0])
            missing = min(
                missing, self.settings.max_sidecars - len(self._sidecars) - self._creating
            )
            if may_create is not None:
                missing = min(missing, may_create)
            self._creating += max(missing, 0)
        for _ in range(max(missing, 0)):
            try:
                sidecar = await self._create(self.key)
            except Exception as error:
                log.warning("could not pre-warm a sidecar of %s: %s", self.key.image_id[:19], error)
                async with self._changed:
                    self._creating -= 1
                    self._changed.notify_all()  # a lease waiting for room may go ahead now
                continue
            async with self._changed:
                self._creating -= 1
                self.stats.created += 1
                self._sidecars.append(sidecar)
                self._changed.notify_all()

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
            self._changed.notify_all()
        await self._destroy(sidecar)
        return True

    async def close(self) -> None:
        async with self._changed:
            for sidecar in list(self._sidecars):
                self._remove(sidecar)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
