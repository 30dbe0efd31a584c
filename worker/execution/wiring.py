"""Builds the execution side (Docker runtime, pools, executor, service) and owns its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.config import Settings
from worker.errors import FailedPrecondition
from worker.execution.executor import ActionExecutor
from worker.execution.operations import OperationStore
from worker.execution.service import ExecutionService
from worker.execution.sidecar_run import SidecarRun
from worker.execution.startup import (
    ExecutionReadiness,
    ReadinessListener,
    prove_exec_root_shared,
    wait_for_daemon,
)
from worker.handles import empty_dir, remove_tree
from worker.pool.events import PoolEvents
from worker.pool.pools import SidecarPools
from worker.reapi import re_pb2
from worker.runtime.docker import DockerRuntime
from worker.runtime.exec_waiter import ExecWaiter
from worker.runtime.protocol import ContainerRuntime, ContainerRuntimeError

log = logging.getLogger(__name__)

DEFAULT_RUNNER = Path(__file__).resolve().parents[2] / "sidecar" / "build" / "sidecar-runner"


@dataclass(frozen=True)
class ExecRoot:
    """The worker's directories under the exec root (only `sidecars/<name>` is ever mounted)."""

    sidecars: Path
    runner: Path
    trash: Path


def prepare_exec_root(exec_root: Path, runner: Path) -> ExecRoot:
    """Creates `sidecars/` (one directory per sidecar), `runner/` holding a read-only copy of
    the runner, and `trash/` (finished action directories waiting for removal). Whatever an
    earlier run left in them is removed, at any depth, without following a symlink; the
    sidecar directories themselves go once their containers are gone (SidecarPools)."""
    if not runner.is_file():
        raise FailedPrecondition(f"sidecar runner {runner} is missing; build it with `make`")
    exec_root.mkdir(parents=True, exist_ok=True)
    os.chmod(exec_root, 0o755)
    layout = ExecRoot(exec_root / "sidecars", exec_root / "runner", exec_root / "trash")
    # sidecars/ and trash/ are root's alone: what actions leave there (a setgid file, say) must
    # be out of reach of every other user of the host. Sidecars bind-mount their own directory,
    # so they never traverse this one.
    for directory, mode in (
        (layout.sidecars, 0o700),
        (layout.runner, 0o755),
        (layout.trash, 0o700),
    ):
        directory.mkdir(exist_ok=True)
        os.chmod(directory, mode)
    empty_dir(layout.trash)
    if (exec_root / "actions").exists():  # the layout before per-sidecar directories
        remove_tree(exec_root / "actions")
    staged = layout.runner / ".sidecar-runner.new"
    shutil.copyfile(runner, staged)
    os.chmod(staged, 0o555)
    os.replace(staged, layout.runner / "sidecar-runner")
    return layout


class ExecutionSide:
    """Everything execution needs, started after the storage and stopped before it."""

    def __init__(
        self,
        settings: Settings,
        worker_name: str,
        worker_id: str,
        store: DiskBlobStore,
        action_cache: DiskActionCache,
        runtime: ContainerRuntime | None = None,
        pool_events: PoolEvents | None = None,
        on_operation_finished: Callable[[re_pb2.ExecuteResponse], None] | None = None,
    ) -> None:
        execution = settings.execution
        self._settings = settings
        self._watcher: asyncio.Task[None] | None = None
        self.exec_root = prepare_exec_root(
            settings.exec_root, execution.runner_path or DEFAULT_RUNNER
        )
        self.runtime = runtime or DockerRuntime(
            execution.docker_url,
            pull_timeout_s=execution.pull_timeout_s,
            timeout_s=execution.docker_timeout_s,
        )
        self.limiter = anyio.CapacityLimiter(max(16, execution.max_concurrent_actions * 4))
        self.waiter = ExecWaiter(self.runtime)
        self.pools = SidecarPools(
            self.runtime,
            execution,
            worker_id,
            worker_name,
            self.exec_root.sidecars,
            self.exec_root.runner,
            self.limiter,
            events=pool_events,
        )
        self.executor = ActionExecutor(
            store,
            self.pools,
            SidecarRun(self.runtime, self.waiter, self.limiter),
            execution,
            worker_name,
            self.exec_root.trash,
        )
        self.service = ExecutionService(
            self.executor,
            action_cache,
            OperationStore(on_finish=on_operation_finished),
            slots=execution.max_concurrent_actions,
            queue_size=execution.queue_size,
        )

    async def start(
        self, daemon_wait_s: float | None = None, listener: ReadinessListener | None = None
    ) -> None:
        """Waits for the daemon (health.startup_wait_s unless daemon_wait_s is given), proves
        it shares the exec root (StartupFailed names the setting to fix if not), starts the
        pools and the queue, then watches readiness and tells `listener` of every change."""
        health = self._settings.health
        docker_url = self._settings.execution.docker_url
        while True:
            await wait_for_daemon(
                self.runtime,
                docker_url,
                health.startup_wait_s if daemon_wait_s is None else daemon_wait_s,
                health.startup_backoff_max_s,
            )
            try:
                await anyio.to_thread.run_sync(
                    prove_exec_root_shared, self.runtime, self._settings.exec_root, docker_url
                )
                break
            except ContainerRuntimeError as error:  # it went away again: wait once more
                log.info(
                    "the Docker daemon at %s could not prove the exec root: %s", docker_url, error
                )
                await anyio.sleep(health.startup_backoff_max_s)
        log.info(
            "the Docker daemon at %s shares the exec root %s", docker_url, self._settings.exec_root
        )
        self.waiter.start()
        await self.pools.start()
        self.service.start()
        if listener is not None:
            readiness = ExecutionReadiness(
                self.runtime,
                self._settings.exec_root,
                docker_url,
                health.check_interval_s,
                listener,
            )
            self._watcher = asyncio.create_task(readiness.watch())

    async def drain(self, grace_s: float) -> None:
        """Lets running actions finish for up to grace_s; everything else ends UNAVAILABLE."""
        await self.service.drain(grace_s)
        await self.service.close()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.service.close()
        await self.executor.close()
        await self.pools.close()
        self.waiter.stop()
        self.runtime.close()
