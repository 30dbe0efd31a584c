"""All sidecar pools of this worker: creation, pre-warming, upkeep, clean-up of leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import uuid
from pathlib import Path

import anyio

from worker.config import ExecutionSettings, PoolSettings
from worker.errors import FailedPrecondition, Unavailable
from worker.execution.agent_run import connect_agent
from worker.execution.platform import ExecutionPlatform, image_reference, parse_user
from worker.handles import empty_dir, remove_tree
from worker.pool.images import ImageResolver
from worker.pool.sidecar_pool import PoolKey, Sidecar, SidecarPool
from worker.runner_contract import (
    AGENT_DIR_IN_SIDECAR,
    AGENT_SECRET,
    AGENT_SOCKET,
    RUNNER_DIR_IN_SIDECAR,
    RUNNER_IN_SIDECAR,
)
from worker.runtime.protocol import (
    ContainerNotRunning,
    ContainerRuntime,
    ContainerRuntimeError,
    Mount,
    RuntimeUnavailable,
    SidecarSpec,
)
from worker.runtime.threads import in_thread

log = logging.getLogger(__name__)

# The worker's id (worker.identity): unique per data directory, so services sharing a daemon
# never touch each other's sidecars. The name label is for people reading `docker ps`.
WORKER_LABEL = "sidecar-executor.worker"
NAME_LABEL = "sidecar-executor.worker-name"
IMAGE_LABEL = "sidecar-executor.image"
# How long a new sidecar may wait for room under execution.max_sidecars_total.
ROOM_WAIT_S = 300.0
# How long a new sidecar's agent may take to listen.
AGENT_START_S = 15.0

# What the runner, as root inside a sidecar of a non-root pool, needs: switch to the
# action's user and drop every capability for it (SETUID, SETGID, SETPCAP), kill the
# action's processes (KILL), and empty /tmp and friends and SysV IPC afterwards
# (DAC_OVERRIDE, FOWNER, IPC_OWNER). The action itself keeps none of them.
RUNNER_CAPABILITIES = ["SETUID", "SETGID", "SETPCAP", "KILL", "DAC_OVERRIDE", "FOWNER", "IPC_OWNER"]
# A root action keeps Docker's default capabilities but for MKNOD (a device node in its
# directory, which is on the host's filesystem, would be the host's device), SETFCAP (file
# capabilities), NET_RAW and AUDIT_WRITE.
ROOT_CAPABILITIES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
]
# Scratch places of a non-root sidecar, whose root filesystem is read-only; the runner
# empties them (and /dev/shm, /dev/mqueue) after every action.
SCRATCH_TMPFS = {"/tmp": "rw,nosuid,nodev,mode=1777", "/var/tmp": "rw,nosuid,nodev,mode=1777"}


class SidecarPools:
    """Creates sidecars, keeps one SidecarPool per PoolKey, and removes every container
    labelled with this worker's id at startup and shutdown.

    Each sidecar mounts only its own directory, `SIDECARS_DIR/<name>`, at the same path
    (on the CAS's filesystem, so inputs can be hard links), and the runner read-only. It
    never runs privileged and always with no-new-privileges; a non-root pool's sidecars
    keep only RUNNER_CAPABILITIES and a read-only root filesystem with tmpfs scratch
    places, so nothing an action writes outside its directory outlives the runner's scrub.
    """

    def __init__(
        self,
        runtime: ContainerRuntime,
        settings: ExecutionSettings,
        worker_id: str,
        worker_name: str,
        sidecars_dir: Path,
        runner_dir: Path,
        limiter: anyio.CapacityLimiter,
        maintain_interval_s: float = 5.0,
    ) -> None:
        self._runtime = runtime
        self._settings = settings
        self._worker = worker_id
        self._worker_name = worker_name
        self._sidecars_dir = sidecars_dir
        # Dispatch `agent`: one root-only directory per sidecar for its agent's socket.
        self._agents_dir = sidecars_dir.parent / "agents"
        self._agents_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self._agents_dir, 0o700)
        self._runner_dir = runner_dir
        self._limiter = limiter
        self._maintain_interval_s = maintain_interval_s
        self.images = ImageResolver(runtime, limiter, settings.pull_timeout_s)
        self._pools: dict[PoolKey, SidecarPool] = {}
        self._maintainer: asyncio.Task[None] | None = None
        # Sidecars whose container or directory could not be removed (daemon away): retried.
        self._undestroyed: list[Sidecar] = []
        # Containers of this worker that exist (created and not yet removed), all pools.
        self._live = 0
        self._volumes: dict[str, tuple[str, ...]] = {}

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.remove_leftovers()
        for reference, settings in self._settings.image_pools.items():
            if settings.min_idle > 0:
                try:
                    uid, gid = parse_user(self._settings.default_user)
                    platform = ExecutionPlatform(
                        image=image_reference(reference),
                        network="none",
                        uid=uid,
                        gid=gid,
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
        # Only now that no container of ours runs can their directories go.
        await anyio.to_thread.run_sync(empty_dir, self._sidecars_dir)
        await anyio.to_thread.run_sync(empty_dir, self._agents_dir)

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
        for sidecar in self._undestroyed[:]:
            self._undestroyed.remove(sidecar)
            await self.destroy(sidecar)
        for key, pool in list(self._pools.items()):
            room = max(self._settings.max_sidecars_total - self._live, 0)
            await pool.maintain(self._is_alive, may_create=room)
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
        volumes = self._volumes.get(image_id)
        if volumes is None:  # an image ID names fixed content: asked once per image
            try:
                found = await in_thread(self._limiter, self._runtime.image_volumes, image_id)
            except RuntimeUnavailable as error:
                raise Unavailable(f"image {platform.image!r}: {error}") from None
            except ContainerRuntimeError as error:
                raise FailedPrecondition(f"image {platform.image!r}: {error}") from None
            if len(self._volumes) >= 4096:
                self._volumes.clear()
            volumes = self._volumes[image_id] = tuple(found)
        return PoolKey(
            image_id=image_id,
            user=platform.user,
            network=platform.network,
            cpus=limits.cpus,
            memory_bytes=limits.memory_bytes,
            pids_limit=limits.pids_limit,
            volumes=volumes,
            dispatch=limits.dispatch,
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

    def spec_for(self, key: PoolKey, directory: Path, agent_dir: Path | None = None) -> SidecarSpec:
        root = key.runs_as_root
        mounts = [
            Mount(str(directory), str(directory)),
            Mount(str(self._runner_dir), RUNNER_DIR_IN_SIDECAR, read_only=True),
        ]
        command = ["keepalive"]
        if agent_dir is not None:
            mounts.append(Mount(str(agent_dir), AGENT_DIR_IN_SIDECAR))
            command = ["agent", AGENT_DIR_IN_SIDECAR]
        return SidecarSpec(
            image_id=key.image_id,
            entrypoint=[RUNNER_IN_SIDECAR],
            command=command,
            mounts=mounts,
            labels={
                WORKER_LABEL: self._worker,
                NAME_LABEL: self._worker_name,
                IMAGE_LABEL: key.image_id,
            },
            network=key.network,
            cpus=key.cpus,
            memory_bytes=key.memory_bytes,
            pids_limit=key.pids_limit,
            capabilities=ROOT_CAPABILITIES if root else RUNNER_CAPABILITIES,
            read_only_root=not root,
            tmpfs={} if root else SCRATCH_TMPFS,
        )

    async def _make_room(self) -> None:
        """Waits until one more sidecar fits under max_sidecars_total, evicting the least
        recently used idle sidecar of any pool meanwhile: one client naming many users or
        images cannot make the worker hold unbounded containers."""
        deadline = time.monotonic() + ROOM_WAIT_S
        while self._live >= self._settings.max_sidecars_total:
            idle = [(s.last_used, id(s), s, p) for p in self._pools.values() for s in p.idle()]
            if idle:
                _, _, victim, pool = min(idle)
                await pool.evict(victim)
                continue
            if time.monotonic() >= deadline:
                raise RuntimeUnavailable(
                    f"all {self._settings.max_sidecars_total} sidecars of this worker are busy "
                    "(execution.max_sidecars_total)"
                )
            await asyncio.sleep(0.05)
        self._live += 1

    async def create(self, key: PoolKey) -> Sidecar:
        await self._make_room()
        try:
            return await self._create(key)
        except BaseException:
            self._live -= 1
            raise

    async def _create(self, key: PoolKey) -> Sidecar:
        name = uuid.uuid4().hex[:16]
        directory = self._sidecars_dir / name
        os.mkdir(directory, 0o755)
        agent_dir = self._agents_dir / name if key.dispatch == "agent" else None
        secret = secrets.token_hex(16)
        container_id: str | None = None
        try:
            if agent_dir is not None:
                os.mkdir(agent_dir, 0o700)
                descriptor = os.open(
                    agent_dir / AGENT_SECRET, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
                )
                with os.fdopen(descriptor, "w") as file:
                    file.write(secret)
            container_id = await in_thread(
                self._limiter,
                self._runtime.create_sidecar,
                self.spec_for(key, directory, agent_dir),
            )
            if agent_dir is not None:
                await self._wait_for_agent(agent_dir / AGENT_SOCKET, secret)
        except BaseException:
            if container_id is not None:
                with contextlib.suppress(ContainerRuntimeError):
                    await in_thread(self._limiter, self._runtime.remove_container, container_id)
            await anyio.to_thread.run_sync(remove_tree, directory)
            if agent_dir is not None:
                await anyio.to_thread.run_sync(remove_tree, agent_dir)
            raise
        now = time.monotonic()
        log.debug("created sidecar %s of %s", container_id[:12], key.image_id[:19])
        return Sidecar(
            container_id=container_id,
            key=key,
            created_at=now,
            last_used=now,
            directory=directory,
            agent_socket=agent_dir / AGENT_SOCKET if agent_dir is not None else None,
            agent_secret=secret,
        )

    @staticmethod
    async def _wait_for_agent(socket_path: Path, secret: str) -> None:
        """Waits until a new sidecar's agent listens and proves who it is."""
        deadline = time.monotonic() + AGENT_START_S
        while True:
            try:
                _, writer = await connect_agent(socket_path, secret, deadline_s=1.0)
            except ContainerNotRunning as error:
                if time.monotonic() >= deadline:
                    raise RuntimeUnavailable(
                        f"the agent of a new sidecar did not start: {error}"
                    ) from None
                await asyncio.sleep(0.01)
                continue
            writer.close()
            return

    async def stop(self, sidecar: Sidecar) -> None:
        """Removes the sidecar's container (so no process of its actions can run any more) but
        keeps its directory, whose outputs are still to be collected. Raises
        ContainerRuntimeError if the daemon could not do it."""
        await in_thread(self._limiter, self._runtime.remove_container, sidecar.container_id)

    async def destroy(self, sidecar: Sidecar) -> None:
        """Removes the container, then the sidecar's directory; what cannot be removed now
        (the daemon is away) is retried by upkeep."""
        try:
            await in_thread(self._limiter, self._runtime.remove_container, sidecar.container_id)
            if not sidecar.removed:
                sidecar.removed = True
                self._live -= 1
            if sidecar.directory is not None:
                await anyio.to_thread.run_sync(remove_tree, sidecar.directory)
            if sidecar.agent_socket is not None:
                await anyio.to_thread.run_sync(remove_tree, sidecar.agent_socket.parent)
        except (ContainerRuntimeError, OSError) as error:
            log.warning("could not remove sidecar %s yet: %s", sidecar.short_id, error)
            self._undestroyed.append(sidecar)
