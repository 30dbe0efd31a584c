"""Whether execution can work: wait for the daemon, prove it shares the exec root, keep watching.

In a pod the worker and its Docker daemon are two containers that start in any order and
share the exec root through a volume that each mounts itself. Start-up therefore waits for
the daemon with backoff, then proves the sharing (a nonce written here is read back through
the daemon at the same path) and stops with a message naming the setting to fix when it
fails; afterwards a watcher reports every change of readiness, so gRPC health can say
NOT_SERVING while the daemon is away or the exec root unusable.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from worker.runtime.protocol import ContainerGone, ContainerRuntime, ContainerRuntimeError

log = logging.getLogger(__name__)

# What a readiness watcher is told: None when execution works, otherwise why it does not.
ReadinessListener = Callable[[str | None], Awaitable[None]]


class StartupFailed(OSError):
    """Execution cannot start as configured; the message names the setting to change."""


def probe_dir(exec_root: Path) -> Path:
    """Where the nonces live: a directory of the exec root that nothing else uses."""
    return exec_root / "probe"


async def wait_for_daemon(
    runtime: ContainerRuntime, docker_url: str, wait_s: float, backoff_max_s: float
) -> None:
    """Returns once the daemon answers a ping; retries with doubling pauses up to backoff_max_s.
    wait_s > 0 bounds the whole wait (then StartupFailed), 0 waits for as long as it takes."""
    deadline = time.monotonic() + wait_s if wait_s > 0 else math.inf
    pause = min(0.25, backoff_max_s)
    while True:
        try:
            await anyio.to_thread.run_sync(runtime.ping)
            return
        except ContainerRuntimeError as error:
            if time.monotonic() >= deadline:
                raise StartupFailed(
                    f"no Docker daemon answered at {docker_url} (execution.docker_url) within "
                    f"{wait_s:g} s (health.startup_wait_s): {error}; start the daemon, point "
                    "execution.docker_url at it, or set execution.enabled=false for a "
                    "cache-only server"
                ) from None
            log.info(
                "waiting for the Docker daemon at %s (execution.docker_url): %s; next try in %.1fs",
                docker_url,
                error,
                pause,
            )
            await anyio.sleep(pause)
            pause = min(pause * 2, backoff_max_s)


def prove_exec_root_shared(runtime: ContainerRuntime, exec_root: Path, docker_url: str) -> None:
    """Writes a random nonce under the exec root and reads it back through the daemon at the
    same path. Blocking. StartupFailed when the daemon sees something else there (a volume
    mounted at another path in its container, or not at all); ContainerRuntimeError when the
    daemon cannot be asked."""
    directory = probe_dir(exec_root)
    directory.mkdir(mode=0o700, exist_ok=True)
    nonce = secrets.token_hex(16)
    path = directory / f"nonce-{nonce}"
    path.write_text(nonce)
    try:
        try:
            seen = runtime.read_shared_file(str(path))
        except ContainerGone as error:
            seen_text = f"it is not there ({error})"
        else:
            if seen == nonce.encode():
                return
            seen_text = f"it holds {seen[:64]!r} instead"
        raise StartupFailed(
            f"the Docker daemon at {docker_url} does not see the exec root {exec_root} as this "
            f"worker does: a nonce written to {path} was read back through the daemon and "
            f"{seen_text}. Mount the same volume at the same path in the worker's and the "
            "daemon's containers, or set execution.exec_root (default DATA_DIR/exec) to a "
            "path both of them see"
        )
    finally:
        path.unlink(missing_ok=True)


def check_exec_root_usable(exec_root: Path) -> None:
    """Raises OSError unless a file can be written, read back and removed under the exec root."""
    directory = probe_dir(exec_root)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "alive"
    data = secrets.token_bytes(16)
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    try:
        if path.read_bytes() != data:
            raise OSError(f"{path} did not read back what was written")
    finally:
        path.unlink(missing_ok=True)


class ExecutionReadiness:
    """Checks every `interval_s` that the daemon answers and the exec root is usable; after
    a failure the exec-root sharing is proved again before execution counts as ready."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        exec_root: Path,
        docker_url: str,
        interval_s: float,
        listener: ReadinessListener,
    ) -> None:
        self._runtime = runtime
        self._exec_root = exec_root
        self._docker_url = docker_url
        self._interval_s = interval_s
        self._listener = listener
        # One check thread at a time: a hung daemon holds it, and later checks time out.
        self._limiter = anyio.CapacityLimiter(1)
        self.problem: str | None = None

    async def check(self) -> str | None:
        """None when execution can work now, otherwise the reason it cannot."""
        try:
            await anyio.to_thread.run_sync(check_exec_root_usable, self._exec_root)
        except OSError as error:
            return f"the exec root {self._exec_root} is not usable (execution.exec_root): {error}"
        try:
            with anyio.fail_after(max(self._interval_s, 1.0)):
                await anyio.to_thread.run_sync(
                    self._runtime.ping, limiter=self._limiter, abandon_on_cancel=True
                )
                if self.problem is not None:
                    await anyio.to_thread.run_sync(
                        prove_exec_root_shared,
                        self._runtime,
                        self._exec_root,
                        self._docker_url,
                        limiter=self._limiter,
                        abandon_on_cancel=True,
                    )
        except TimeoutError:
            return f"the Docker daemon at {self._docker_url} did not answer in time"
        except ContainerRuntimeError as error:
            return f"the Docker daemon at {self._docker_url} cannot be reached: {error}"
        except StartupFailed as error:
            return str(error)
        return None

    async def watch(self) -> None:
        """Runs until cancelled, telling the listener each time readiness changes."""
        while True:
            await anyio.sleep(self._interval_s)
            problem = await self.check()
            if problem != self.problem:
                if problem is None:
                    log.info("execution is ready again")
                else:
                    log.warning("execution is not ready: %s", problem)
                self.problem = problem
                await self._listener(problem)
