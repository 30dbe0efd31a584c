"""All sidecar pools of this worker: creation, pre-warming, upkeep, clean-up of leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import anyio

from worker.config import ExecutionSettings, PoolSettings
from worker.execution.platform import ExecutionPlatform, image_reference
from worker.pool.images import ImageResolver
from worker.pool.sidecar_pool import PoolKey, Sidecar, SidecarPool
from worker.runtime.protocol import (
    ContainerRuntime,
    ContainerRuntimeError,
    Mount,
    SidecarSpec,
)
from worker.runtime.threads import in_thread

log = logging.getLogger(__name__)

WORKER_LABEL = "sidecar-executor.worker"
IMAGE_LABEL = "sidecar-executor.image"
RUNNER_DIR_IN_SIDECAR = "/.sidecar-executor"
RUNNER_IN_SIDECAR = f"{RUNNER_DIR_IN_SIDECAR}/sidecar-runner"


class SidecarPools:
    """Creates sidecars with the runner mounted read-only and the actions directory shared at
    the same path, keeps one SidecarPool per PoolKey, and removes every container labelled as
    this worker's at startup and shutdown."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        settings: ExecutionSettings,
        worker_name: str,
        actions_dir: Path,
        runner_dir: Path,
        limiter: anyio.CapacityLimiter,
        maintain_interval_s: float = 5.0,
    ) -> None:
        self._runtime = runtime
        self._settings = settings
        self._worker = worker_name
        self._actions_dir = actions_dir
        self._runner_dir = runner_dir
        self._limiter = limiter
        self._maintain_interval_s = maintain_interval_s
        self.images = ImageResolver(runtime, limiter, settings.pull_timeout_s)
        self._pools: dict[PoolKey, SidecarPool] = {}
        self._maintainer: asyncio.Task[None] | None = None

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.remove_leftovers()
        for reference, settings in self._settings.image_pools.items():
            if settings.min_idle > 0:
                try:
                    platform = ExecutionPlatform(
                        image=image_reference(reference),
                        network="none",
                        user=self._settings.default_user,
                        reuse_sidecar=True,
                    )
                    self.pool_for(await self.key_for(platform), platform.image)
                except Exception as error:
                    log.warning("cannot pre-warm %s: %s", reference, error)
        await self.maintain_all()
        self._maintainer = asyncio.create_task(self._maintain_forever())

    async def remove_leftovers(self) -> None:
        leftovers = await in_thread(
            self._limiter, self._runtime.containers_with_label, WORKER_LABEL, self._worker
        )
        for container_id in leftovers:
            await in_thread(self._limiter, self._runtime.remove_container, container_id)
        if leftovers:
            log.info("removed %d sidecars left over from an earlier run", len(leftovers))

    async def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        for pool in self._pools.values():
            await pool.close()
        with contextlib.suppress(ContainerRuntimeError):
            await self.remove_leftovers()

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self._maintain_interval_s)
            try:
                await self.maintain_all()
            except Exception:
                log.exception("sidecar pool upkeep failed")

    async def maintain_all(self) -> None:
        for key, pool in list(self._pools.items()):
            await pool.maintain(self._is_alive)
            if pool.is_empty and pool.settings.min_idle == 0:
                del self._pools[key]  # Many images or users over time must not pile up.

    async def _is_alive(self, sidecar: Sidecar) -> bool:
        try:
            return bool(
                await in_thread(self._limiter, self._runtime.is_running, sidecar.container_id)
            )
        except ContainerRuntimeError:
            return True  # Daemon trouble: do not throw sidecars away on a guess.

    # ------------------------------------------------------------------ pools

    def _pool_settings(self, image: str) -> PoolSettings:
        return self._settings.pool_for(image)

    async def key_for(self, platform: ExecutionPlatform) -> PoolKey:
        image_id = await self.images.resolve(platform.image)
        limits = self._pool_settings(platform.image)
        return PoolKey(
            image_id=image_id,
            user=platform.user,
            network=platform.network,
            cpus=limits.cpus,
            memory_bytes=limits.memory_bytes,
            pids_limit=limits.pids_limit,
        )

    def pool_for(self, key: PoolKey, image: str) -> SidecarPool:
        """The pool of `key` (from key_for), made with `image`'s pool settings if new."""
        pool = self._pools.get(key)
        if pool is None:
            pool = SidecarPool(key, self._pool_settings(image), self.create, self.destroy)
            self._pools[key] = pool
        return pool

    @property
    def pools(self) -> list[SidecarPool]:
        return list(self._pools.values())

    # ------------------------------------------------------- single sidecars

    def spec_for(self, key: PoolKey) -> SidecarSpec:
        return SidecarSpec(
            image_id=key.image_id,
            entrypoint=[RUNNER_IN_SIDECAR],
            command=["keepalive"],
            mounts=[
                Mount(str(self._actions_dir), str(self._actions_dir)),
                Mount(str(self._runner_dir), RUNNER_DIR_IN_SIDECAR, read_only=True),
            ],
            labels={WORKER_LABEL: self._worker, IMAGE_LABEL: key.image_id},
            network=key.network,
            cpus=key.cpus,
            memory_bytes=key.memory_bytes,
            pids_limit=key.pids_limit,
        )

    async def create(self, key: PoolKey) -> Sidecar:
        container_id = await in_thread(
            self._limiter, self._runtime.create_sidecar, self.spec_for(key)
        )
        now = time.monotonic()
        log.debug("created sidecar %s of %s", container_id[:12], key.image_id[:19])
        return Sidecar(container_id=container_id, key=key, created_at=now, last_used=now)

    async def destroy(self, sidecar: Sidecar) -> None:
        try:
            await in_thread(self._limiter, self._runtime.remove_container, sidecar.container_id)
        except ContainerRuntimeError as error:
            log.warning("could not remove sidecar %s: %s", sidecar.short_id, error)
