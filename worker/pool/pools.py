"""All sidecar pools of this worker: creation, pre-warming, upkeep, clean-up of leftovers, and
the operators' changes (scale, drain, recycle, refresh, reload) to the running pools."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import secrets
import time
import uuid
from pathlib import Path

import anyio

from worker.config import ExecutionSettings, PoolSettings
from worker.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from worker.handles import empty_dir, remove_tree
from worker.pool.agent_socket import connect_agent
from worker.pool.events import NoEvents, PoolEvents
from worker.pool.images import ImageResolver, is_digest
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
# Pool settings that are part of the PoolKey: changing them makes new sidecars of a new pool.
KEY_FIELDS = ("cpus", "memory_bytes", "pids_limit", "dispatch")

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
        events: PoolEvents | None = None,
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
        self._events: PoolEvents = events or NoEvents()
        self.images = ImageResolver(runtime, limiter, settings.pull_timeout_s, events=self._events)
        self._pools: dict[PoolKey, SidecarPool] = {}
        # Pools whose image or settings were replaced: they serve no new lease and go once
        # their sidecars are gone.
        self._retiring: list[SidecarPool] = []
        # Operators' changes (pools scale), by image reference, on top of the settings.
        self._overrides: dict[str, PoolSettings] = {}
        self._drained: set[str] = set()
        # Pre-warms that failed (image missing, daemon away): retried by every upkeep.
        self._warm_failures: dict[str, str] = {}
        self._upkeep_wanted = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None
        # Sidecars whose container or directory could not be removed (daemon away): retried.
        self._undestroyed: list[Sidecar] = []
        # Containers of this worker that exist (created and not yet removed), all pools.
        self._live = 0
        self._volumes: dict[str, tuple[str, ...]] = {}

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.remove_leftovers()
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
        for pool in [*self._pools.values(), *self._retiring]:
            await pool.close()
        with contextlib.suppress(ContainerRuntimeError):
            await self.remove_leftovers()

    async def _maintain_forever(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # arrives as the event is set, and close() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._maintain_interval_s):
                    await self._upkeep_wanted.wait()
            self._upkeep_wanted.clear()
            try:
                await self.maintain_all()
            except Exception:
                log.exception("sidecar pool upkeep failed")

    def wake_upkeep(self) -> None:
        """Runs upkeep now rather than at the next interval (a pool asked for more sidecars)."""
        self._upkeep_wanted.set()

    async def maintain_all(self) -> None:
        for sidecar in self._undestroyed[:]:
            self._undestroyed.remove(sidecar)
            await self.destroy(sidecar)
        await self._keep_configured_pools_warm()
        for key, pool in list(self._pools.items()):
            room = max(self._settings.max_sidecars_total - self._live, 0)
            await pool.maintain(self._is_alive, may_create=room)
            if pool.is_empty and pool.warm_target == 0 and not pool.draining:
                del self._pools[key]  # Many images or users over time must not pile up.
        for pool in self._retiring[:]:
            await pool.maintain(self._is_alive, may_create=0)
            if pool.is_empty:
                self._retiring.remove(pool)

    async def _keep_configured_pools_warm(self) -> None:
        """Every image with min_idle > 0 (configured or scaled) has its pool, for the default
        user and network `none`, on the image the reference names now (a pool of an older
        image of it is superseded). A failure is logged once and retried at every upkeep."""
        references = {*self._settings.image_pools, *self._overrides}
        for reference in sorted(references):
            if reference in self._drained or self.settings_for(reference).min_idle == 0:
                continue
            try:
                key = await self.key_for(reference, self._settings.default_user, "none")
            except Exception as error:
                if self._warm_failures.get(reference) != str(error):
                    log.warning("cannot pre-warm %s (retried): %s", reference, error)
                self._warm_failures[reference] = str(error)
                continue
            if self._warm_failures.pop(reference, None) is not None:
                log.info("pre-warming %s now works", reference)
            self.pool_for(key, reference)
            for other in self.find(reference):
                if (other.key.user, other.key.network) == (key.user, key.network) and (
                    other.key.image_id != key.image_id
                ):
                    log.info(
                        "%s now names %s; the pool of %s winds down",
                        reference,
                        key.image_id[:19],
                        other.key.image_id[:19],
                    )
                    await self._supersede(other)

    async def _is_alive(self, sidecar: Sidecar) -> bool:
        try:
            return bool(
                await in_thread(self._limiter, self._runtime.is_running, sidecar.container_id)
            )
        except ContainerRuntimeError:
            return True  # Daemon trouble: do not throw sidecars away on a guess.

    # ------------------------------------------------------------------ pools

    def settings_for(self, image: str) -> PoolSettings:
        """The pool settings of an image: an operator's change, else the configuration's."""
        return self._overrides.get(image) or self._settings.pool_for(image)

    async def key_for(self, image: str, user: str, network: str) -> PoolKey:
        """The key of the pool for `image` (a reference, resolved by its pull policy), the
        canonical `uid:gid` `user` and `network`."""
        limits = self.settings_for(image)
        image_id = await self.images.resolve(image, limits.pull_policy, limits.pull_interval_s)
        volumes = self._volumes.get(image_id)
        if volumes is None:  # an image ID names fixed content: asked once per image
            try:
                found = await in_thread(self._limiter, self._runtime.image_volumes, image_id)
            except RuntimeUnavailable as error:
                raise Unavailable(f"image {image!r}: {error}") from None
            except ContainerRuntimeError as error:
                raise FailedPrecondition(f"image {image!r}: {error}") from None
            if len(self._volumes) >= 4096:
                self._volumes.clear()
            volumes = self._volumes[image_id] = tuple(found)
        return PoolKey(
            image_id=image_id,
            user=user,
            network=network,
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
            pool = SidecarPool(
                key,
                self.settings_for(image),
                self.create,
                self.destroy,
                reference=image,
                events=self._events,
                wake_upkeep=self.wake_upkeep,
            )
            pool.draining = image in self._drained
            self._pools[key] = pool
        return pool

    @property
    def pools(self) -> list[SidecarPool]:
        """The pools serving new leases."""
        return list(self._pools.values())

    @property
    def retiring_pools(self) -> list[SidecarPool]:
        """Pools replaced by a newer image or settings, until their sidecars are gone."""
        return list(self._retiring)

    async def _supersede(self, pool: SidecarPool) -> None:
        if self._pools.get(pool.key) is pool:
            del self._pools[pool.key]
            self._retiring.append(pool)
        await pool.supersede()

    # -------------------------------------------------------------- operators

    def find(self, image: str) -> list[SidecarPool]:
        """The serving pools of an image, named as clients name it (`docker://` optional) or
        by (a prefix of) its image ID."""
        image = image.removeprefix("docker://").strip()
        by_id = image if image.startswith("sha256:") else f"sha256:{image}"
        return [
            p
            for p in self._pools.values()
            if p.reference == image or (len(by_id) >= 19 and p.key.image_id.startswith(by_id))
        ]

    def _known(self, image: str) -> list[SidecarPool]:
        """The pools of an image an operator names; NotFound if it has none and is not
        configured."""
        found = self.find(image)
        reference = image.removeprefix("docker://").strip()
        if not found and reference not in {*self._settings.image_pools, *self._overrides}:
            raise NotFound(
                f"no pool of image {image!r} on this worker (and none configured); "
                "`pools list` shows the pools"
            )
        return found

    async def scale(
        self,
        image: str,
        min_idle: int | None = None,
        max_sidecars: int | None = None,
        idle_ttl_s: float | None = None,
    ) -> PoolSettings:
        """Changes an image's pool settings now (pre-warms or sheds at once) and lifts a
        drain. Lasts until a reload changes that image's entry, or a restart."""
        reference = image.removeprefix("docker://").strip()
        if not reference or any(c.isspace() for c in reference):
            raise InvalidArgument(f"{image!r} is not an image reference")
        if not any(fnmatch.fnmatchcase(reference, p) for p in self._settings.allowed_images):
            raise FailedPrecondition(
                f"image {reference!r} is not in execution.allowed_images; no action could use "
                "its pool"
            )
        changes: dict[str, object] = {}
        for name, value in (
            ("min_idle", min_idle),
            ("max_sidecars", max_sidecars),
            ("idle_ttl_s", idle_ttl_s),
        ):
            if value is not None:
                if value < 0:
                    raise InvalidArgument(f"{name} must not be negative (got {value})")
                changes[name] = value
        current = self.settings_for(reference)
        try:
            updated = PoolSettings.model_validate({**current.model_dump(), **changes})
        except ValueError as error:
            raise InvalidArgument(f"invalid pool settings: {error}") from None
        if updated.min_idle > updated.max_sidecars:
            raise InvalidArgument(
                f"min_idle {updated.min_idle} is above max_sidecars {updated.max_sidecars}"
            )
        pools = self.find(reference)
        if not pools and updated.min_idle > 0:
            # Resolves (or pulls) the image now, so an unknown one is an error here.
            await self.key_for(reference, self._settings.default_user, "none")
        self._overrides[reference] = updated
        self._drained.discard(reference)
        for pool in pools:
            await pool.resume()
            await pool.update(updated)
        log.info(
            "operator: pool of %s scaled to min_idle=%d max_sidecars=%d idle_ttl_s=%g",
            reference,
            updated.min_idle,
            updated.max_sidecars,
            updated.idle_ttl_s,
        )
        self.wake_upkeep()
        return updated

    async def drain(self, image: str) -> int:
        """No new leases for the image's pools; running actions finish, then the sidecars
        go. New actions wait or are refused (pool setting when_drained). Returns how many
        pools were drained."""
        pools = self._known(image)
        self._drained.add(image.removeprefix("docker://").strip())
        for pool in pools:
            await pool.drain()
        log.info("operator: drained the %d pool(s) of %s", len(pools), image)
        self.wake_upkeep()
        return len(pools)

    async def recycle(self, image: str) -> int:
        """Replaces every sidecar of the image's pools once its actions are done. Returns
        how many sidecars were retired."""
        retired = 0
        for pool in self._known(image):
            retired += await pool.recycle()
        log.info("operator: recycling %d sidecar(s) of %s", retired, image)
        self.wake_upkeep()
        return retired

    async def refresh(self, image: str) -> tuple[list[str], str]:
        """Re-resolves a tag (pulling it) and moves its pools to the image it names now: new
        actions get sidecars of the new image, the old pools wind down once their actions are
        done. Returns the image IDs the pools had and the one the tag names now."""
        reference = image.removeprefix("docker://").strip()
        if is_digest(reference):
            raise InvalidArgument(f"{image!r} names a digest, which never moves")
        pools = self._known(reference)
        before = sorted({p.key.image_id for p in pools})
        image_id = await self.images.refresh(reference)
        moved = [p for p in pools if p.key.image_id != image_id]
        for pool in moved:
            key = await self.key_for(reference, pool.key.user, pool.key.network)
            fresh = self.pool_for(key, reference)
            await fresh.update(pool.settings)
            await self._supersede(pool)
        log.info(
            "operator: refreshed %s: %s -> %s (%d pool(s) moved)",
            reference,
            ",".join(i[:19] for i in before) or "no pool",
            image_id[:19],
            len(moved),
        )
        self.wake_upkeep()
        return before, image_id

    async def apply_settings(self, settings: ExecutionSettings) -> list[str]:
        """A reloaded configuration's pool settings, applied in place. An image whose entry
        changed (or was added or removed) loses an operator's change of it; its pools get the
        new settings, or, when a setting that keys the pool (limits, dispatch) changed, wind
        down for new ones. The pools of a removed entry wind down (drain gracefully: idle
        sidecars go now, busy ones when done); its next action gets a pool with the defaults.
        Returns the images whose settings changed."""
        old = self._settings
        self._settings = settings
        changed = sorted(
            reference
            for reference in {*old.image_pools, *settings.image_pools}
            if old.image_pools.get(reference) != settings.image_pools.get(reference)
        )
        for reference in changed:
            self._overrides.pop(reference, None)
        removed = set(old.image_pools) - set(settings.image_pools)
        for pool in list(self._pools.values()):
            wanted = self.settings_for(pool.reference)
            if pool.reference in removed:
                await self._supersede(pool)  # its idle sidecars go now, busy ones after
            elif wanted == pool.settings:
                continue
            elif any(getattr(wanted, f) != getattr(pool.key, f) for f in KEY_FIELDS):
                await self._supersede(pool)
            else:
                await pool.update(wanted)
        self.wake_upkeep()
        return changed

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
            idle = [
                (s.last_used, id(s), s, p)
                for p in [*self._pools.values(), *self._retiring]
                for s in p.idle()
            ]
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
