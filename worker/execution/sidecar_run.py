"""Runs one action in a leased sidecar through the runner, and judges what it reported."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from worker.handles import (
    LeavesTree,
    open_dir_at,
    open_regular_file_at,
    open_trusted_dir,
    opened,
)
from worker.pool.sidecar_pool import Sidecar
from worker.runner_contract import (
    CONTROL,
    ENVIRONMENT,
    REPORT,
    ActionDir,
    RunnerReport,
    RunRequest,
    cancel_argv,
    environment_entries,
    parse_report,
)
from worker.runtime.exec_waiter import ExecWaiter
from worker.runtime.protocol import (
    ContainerNotRunning,
    ContainerRuntime,
    ContainerRuntimeError,
    ExecSpec,
    RuntimeRejected,
    RuntimeUnavailable,
)
from worker.runtime.threads import in_thread

log = logging.getLogger(__name__)

# How long past its timeout (or a cancel) an action may take before the sidecar is given up.
GRACE_S = 10.0

# The runner's own exit code for each outcome (sidecar/README.md); a report that disagrees
# with how the exec ended was not written by a runner that finished.
_RUNNER_ERROR_EXIT = 125
_TIMEOUT_EXIT = 124

KILLED_EXIT_CODE = 128 + signal.SIGKILL


@dataclass(frozen=True)
class RunOutcome:
    """How an action ended, from facts the action cannot forge.

    kind: exited | signaled | timeout | cancelled | unclean | runner_error | lost. `clean`
    means the runner confirmed that no process of the action survived and that the
    sidecar's scratch places were emptied; only then may the sidecar serve another action.
    """

    kind: str
    code: int
    strays_killed: int = 0
    oom_kills: int = 0
    clean: bool = False
    detail: str = ""

    @property
    def exit_code(self) -> int:
        """The action's exit code as a shell would report it: 128+N for signal N, and
        128+SIGKILL for an action that was killed because it timed out or was cancelled."""
        if self.kind == "exited":
            return self.code
        if self.kind == "signaled":
            return 128 + self.code
        if self.kind in ("timeout", "cancelled"):
            return KILLED_EXIT_CODE
        return 0

    @property
    def tree_killed(self) -> bool:
        """The runner reported that it killed and reaped the action's whole process tree."""
        return self.kind in ("exited", "signaled", "timeout", "cancelled") and self.code >= 0

    @property
    def sidecar_reusable(self) -> bool:
        """Only a sidecar whose action ended by itself, not by the OOM killer, and that the
        runner confirmed clean, is reused."""
        return self.kind in ("exited", "signaled") and self.oom_kills == 0 and self.clean


def _runner_exit_code(report: RunnerReport) -> int:
    if report.outcome == "exited":
        return report.code
    if report.outcome == "timeout":
        return _TIMEOUT_EXIT
    if report.outcome in ("unclean", "runner_error"):
        return _RUNNER_ERROR_EXIT
    return 128 + report.code


def read_report(action: ActionDir) -> RunnerReport | None | str:
    """The runner's report from the action's root-only control directory: the report,
    None if there is none, or a string saying why what is there cannot be believed."""
    try:
        with (
            opened(open_trusted_dir(action.sidecar_dir)) as sidecar_fd,
            opened(open_dir_at(sidecar_fd, action.name)) as action_fd,
            opened(open_dir_at(action_fd, CONTROL)) as control_fd,
        ):
            found = open_regular_file_at(control_fd, REPORT)
            if found is None:
                return None
            fd, _ = found
            with opened(fd):
                data = os.read(fd, 4096)
    except (LeavesTree, FileNotFoundError):
        return "the action directory was replaced"
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None
        raise
    try:
        report = parse_report(data.decode())
    except UnicodeDecodeError:
        report = None
    return report if report is not None else "the report is malformed"


def write_environment(action: ActionDir, env: dict[str, str]) -> None:
    """CONTROL_DIR/env for `run` (sidecar/README.md): NUL-terminated NAME=value entries."""
    with (
        opened(open_trusted_dir(action.sidecar_dir)) as sidecar_fd,
        opened(open_dir_at(sidecar_fd, action.name)) as action_fd,
        opened(open_dir_at(action_fd, CONTROL)) as control_fd,
    ):
        fd = os.open(
            ENVIRONMENT,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=control_fd,
        )
        with os.fdopen(fd, "wb") as file:
            file.write(environment_entries(env))


def judge(
    report: RunnerReport | None | str, exec_exit: int | None, request: RunRequest
) -> RunOutcome:
    """Turns the report into an outcome; anything doubtful is `lost` (the sidecar goes)."""
    if report is None:
        # No report: the runner itself was killed (OOM, a root action's kill -1, a dying
        # container). Its exec's exit code is all there is.
        return RunOutcome(kind="lost", code=exec_exit if exec_exit is not None else -1)
    if isinstance(report, str):
        return RunOutcome(kind="lost", code=-1, detail=report)
    if exec_exit is not None and exec_exit != _runner_exit_code(report):
        return RunOutcome(
            kind="lost",
            code=exec_exit,
            detail=f"the runner's exit code {exec_exit} contradicts its report",
        )
    scrubbed = report.scrubbed or not request.scrub
    clean = report.survivors == 0 and scrubbed and request.uid != 0 and request.gid != 0
    if report.survivors:
        log.warning("%d process(es) of uid %d outlived their action", report.survivors, request.uid)
    return RunOutcome(
        kind=report.outcome,
        code=report.code,
        strays_killed=report.strays_killed,
        oom_kills=report.oom_kills,
        clean=clean,
    )


async def wait_or_cancel(
    finished: asyncio.Future[Any],
    cancelled: asyncio.Event,
    timeout_s: float,
    cancel: Callable[[], Awaitable[None]],
) -> bool:
    """Waits for `finished` up to the action's timeout and GRACE_S; on a cancel meanwhile,
    calls `cancel` and waits GRACE_S more. True if `finished` completed (it is cancelled
    otherwise)."""
    cancel_requested: asyncio.Future[Any] = asyncio.ensure_future(cancelled.wait())
    try:
        first: set[asyncio.Future[Any]] = {finished, cancel_requested}
        await asyncio.wait(first, timeout=timeout_s + GRACE_S, return_when=asyncio.FIRST_COMPLETED)
        if cancel_requested.done() and not finished.done():
            await cancel()
            await asyncio.wait({finished}, timeout=GRACE_S)
    finally:
        cancel_requested.cancel()
        if not finished.done():
            finished.cancel()
    return finished.done() and not finished.cancelled()


class SidecarRun:
    """Starts the runner with a detached exec (as root: it drops to the action's user itself)
    and waits for it, with cancel and a watchdog."""

    def __init__(
        self, runtime: ContainerRuntime, waiter: ExecWaiter, limiter: anyio.CapacityLimiter
    ) -> None:
        self._runtime = runtime
        self._waiter = waiter
        self._limiter = limiter

    async def run(
        self,
        sidecar: Sidecar,
        action: ActionDir,
        request: RunRequest,
        env: dict[str, str],
        timeout_s: float,
        cancelled: asyncio.Event,
    ) -> RunOutcome:
        """Raises ContainerGone/ContainerNotRunning if the exec could not start (the caller may
        retry in another sidecar); otherwise returns how the action ended."""
        # The action's variables go in a root-only file, not in the root runner's own
        # environment (a client's GLIBC_TUNABLES must never reach its libc).
        await anyio.to_thread.run_sync(write_environment, action, env)
        exec_id = await self._start(sidecar, ExecSpec(request.runner_argv(), user="0:0"))
        finished = asyncio.ensure_future(self._waiter.wait(exec_id))
        ended = await wait_or_cancel(
            finished, cancelled, timeout_s, functools.partial(self._cancel, sidecar, action)
        )
        if not ended:
            log.warning("runner in sidecar %s did not end; giving the sidecar up", sidecar.short_id)
            if cancelled.is_set():
                return RunOutcome(kind="cancelled", code=-1, detail="runner lost")
            return RunOutcome(kind="timeout", code=-1, detail="the runner did not end in time")
        report = await anyio.to_thread.run_sync(read_report, action)
        return judge(report, finished.result(), request)

    async def _start(self, sidecar: Sidecar, spec: ExecSpec) -> str:
        """Starts the exec. A sidecar that died as the exec started makes the daemon answer
        with all sorts of 4xx and 5xx errors; if the container is not running afterwards,
        that is ContainerNotRunning (the caller replaces the sidecar), not the daemon's fault
        and not the action's."""
        try:
            return await in_thread(
                self._limiter, self._runtime.start_exec, sidecar.container_id, spec
            )
        except (RuntimeRejected, RuntimeUnavailable) as error:
            try:
                running = await in_thread(
                    self._limiter, self._runtime.is_running, sidecar.container_id
                )
            except ContainerRuntimeError:
                raise error from None
            if running:
                raise
            raise ContainerNotRunning(
                f"sidecar {sidecar.short_id} stopped as the action started ({error})"
            ) from error

    async def _cancel(self, sidecar: Sidecar, action: ActionDir) -> None:
        with contextlib.suppress(ContainerRuntimeError):
            await in_thread(
                self._limiter,
                self._runtime.start_exec,
                sidecar.container_id,
                ExecSpec(cancel_argv(action.control), user="0:0"),
            )
