"""Runs one action's command in a leased sidecar through the runner, and reads what it reported."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio

from worker.pool.pools import RUNNER_IN_SIDECAR
from worker.pool.sidecar_pool import Sidecar
from worker.runtime.exec_waiter import ExecWaiter
from worker.runtime.protocol import ContainerRuntime, ContainerRuntimeError, ExecSpec
from worker.runtime.threads import in_thread

log = logging.getLogger(__name__)

# How long past its timeout (or a cancel) an action may take before the sidecar is given up.
GRACE_S = 10.0


@dataclass(frozen=True)
class RunOutcome:
    """What the runner wrote to runner.status, or `lost` if it wrote nothing."""

    kind: str  # exited | signaled | timeout | cancelled | unclean | runner_error | lost
    code: int
    strays_killed: int = 0
    oom_kills: int = 0

    @property
    def exit_code(self) -> int:
        """The action's exit code as a shell would report it (128+N for signal N)."""
        if self.kind == "exited":
            return self.code
        if self.kind == "signaled":
            return 128 + self.code
        return 0

    @property
    def sidecar_reusable(self) -> bool:
        """Only a sidecar whose action ended by itself, and not by the OOM killer, is reused."""
        return self.kind in ("exited", "signaled") and self.oom_kills == 0


def read_runner_status(action_dir: Path) -> RunOutcome | None:
    try:
        text = (action_dir / "runner.status").read_text()
    except FileNotFoundError:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return RunOutcome(
        kind=fields.get("outcome", "lost"),
        code=int(fields.get("code", "0")),
        strays_killed=int(fields.get("strays_killed", "0")),
        oom_kills=max(int(fields.get("oom_kills", "0")), 0),
    )


class SidecarRun:
    """Starts the runner with a detached exec and waits for it, with cancel and a watchdog."""

    def __init__(
        self, runtime: ContainerRuntime, waiter: ExecWaiter, limiter: anyio.CapacityLimiter
    ) -> None:
        self._runtime = runtime
        self._waiter = waiter
        self._limiter = limiter

    async def run(
        self,
        sidecar: Sidecar,
        action_dir: Path,
        working_dir: Path,
        argv: list[str],
        env: dict[str, str],
        user: str,
        timeout_s: float,
        cancelled: asyncio.Event,
    ) -> RunOutcome:
        """Raises ContainerGone/ContainerNotRunning if the exec could not start (the caller may
        retry in another sidecar); otherwise returns how the action ended."""
        runner_argv = [
            RUNNER_IN_SIDECAR,
            "run",
            str(action_dir),
            str(max(int(timeout_s * 1000), 1)),
            str(working_dir),
            "--",
            *argv,
        ]
        exec_id = await in_thread(
            self._limiter,
            self._runtime.start_exec,
            sidecar.container_id,
            ExecSpec(runner_argv, env=env, user=user),
        )
        finished = asyncio.ensure_future(self._waiter.wait(exec_id))
        cancel = asyncio.ensure_future(cancelled.wait())
        try:
            done, _ = await asyncio.wait(
                {finished, cancel}, timeout=timeout_s + GRACE_S, return_when=asyncio.FIRST_COMPLETED
            )
            if cancel in done and finished not in done:
                await self._cancel(sidecar, action_dir, user)
                done, _ = await asyncio.wait({finished}, timeout=GRACE_S)
        finally:
            cancel.cancel()
            if not finished.done():
                finished.cancel()
        if finished not in done or finished.cancelled():
            log.warning("runner in sidecar %s did not end; giving the sidecar up", sidecar.short_id)
            return RunOutcome(kind="lost", code=-1)
        outcome = read_runner_status(action_dir)
        if outcome is None:
            # No report: the runner itself was killed (OOM, a root action's kill -1, a dying
            # container). Its exec's exit code is all there is.
            return RunOutcome(kind="lost", code=finished.result())
        return outcome

    async def _cancel(self, sidecar: Sidecar, action_dir: Path, user: str) -> None:
        with contextlib.suppress(ContainerRuntimeError):
            await in_thread(
                self._limiter,
                self._runtime.start_exec,
                sidecar.container_id,
                ExecSpec([RUNNER_IN_SIDECAR, "cancel", str(action_dir)], user=user),
            )
