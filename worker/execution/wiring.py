"""Builds the execution side (Docker runtime, pools, executor, service) and owns its lifecycle."""

from __future__ import annotations

import logging
import os
import shutil
import time
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
from worker.pool.pools import SidecarPools
from worker.runtime.docker import DockerRuntime
from worker.runtime.exec_waiter import ExecWaiter
from worker.runtime.protocol import ContainerRuntime, ContainerRuntimeError

log = logging.getLogger(__name__)

DEFAULT_RUNNER = Path(__file__).resolve().parents[2] / "sidecar" / "build" / "sidecar-runner"


def prepare_exec_root(exec_root: Path, runner: Path) -> tuple[Path, Path]:
    """Creates `actions/` (emptied, but never replaced: sidecars bind-mount that inode) and
    `runner/` holding a read-only copy of the runner. Returns both."""
    if not runner.is_file():
        raise FailedPrecondition(f"sidecar runner {runner} is missing; build it with `make`")
    actions = exec_root / "actions"
    runner_dir = exec_root / "runner"
    actions.mkdir(parents=True, exist_ok=True)
    runner_dir.mkdir(parents=True, exist_ok=True)
    for leftover in actions.iterdir():
        shutil.rmtree(leftover, ignore_errors=True)
    staged = runner_dir / ".sidecar-runner.new"
    shutil.copyfile(runner, staged)
    os.chmod(staged, 0o555)
    os.replace(staged, runner_dir / "sidecar-runner")
    return actions, runner_dir


class ExecutionSide:
    """Everything execution needs, started after the storage and stopped before it."""

    def __init__(
        self,
        settings: Settings,
        worker_name: str,
        store: DiskBlobStore,
        action_cache: DiskActionCache,
        runtime: ContainerRuntime | None = None,
    ) -> None:
        execution = settings.execution
        self.actions_dir, runner_dir = prepare_exec_root(
            settings.exec_root, execution.runner_path or DEFAULT_RUNNER
        )
        self.runtime = runtime or DockerRuntime(
            execution.docker_url, pull_timeout_s=execution.pull_timeout_s
        )
        self.limiter = anyio.CapacityLimiter(max(16, execution.max_concurrent_actions * 4))
        self.waiter = ExecWaiter(self.runtime)
        self.pools = SidecarPools(
            self.runtime, execution, worker_name, self.actions_dir, runner_dir, self.limiter
        )
        self.executor = ActionExecutor(
            store,
            self.pools,
            SidecarRun(self.runtime, self.waiter, self.limiter),
            execution,
            worker_name,
            self.actions_dir,
        )
        self.service = ExecutionService(
            self.executor,
            action_cache,
            OperationStore(),
            slots=execution.max_concurrent_actions,
            queue_size=execution.queue_size,
        )

    async def start(self, daemon_wait_s: float = 30.0) -> None:
        await self._wait_for_daemon(daemon_wait_s)
        self.waiter.start()
        await self.pools.start()
        self.service.start()

    async def _wait_for_daemon(self, wait_s: float) -> None:
        """In a pod the daemon container may start after us: wait a little for it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                await anyio.to_thread.run_sync(self.runtime.ping)
                return
            except ContainerRuntimeError as error:
                if time.monotonic() >= deadline:
                    raise OSError(
                        f"execution needs a Docker daemon ({error}); start one, or set "
                        "execution.enabled=false for a cache-only server"
                    ) from None
                log.info("waiting for the Docker daemon: %s", error)
                await anyio.sleep(1)

    async def close(self) -> None:
        await self.service.close()
        await self.pools.close()
        self.waiter.stop()
        self.runtime.close()
