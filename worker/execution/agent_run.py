"""Dispatch `agent`: runs one action through the agent that is the sidecar's main process.

The worker talks to the agent over the unix socket in the sidecar's own root-only agent
directory (sidecar/README.md): greeting with the one-time secret (proves the listener is the
agent this worker started), request, `ack` at once, `done CODE` at the end. Hanging up the
writing side cancels. The report is read from the control directory and judged exactly as
for dispatch `exec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio

from worker.errors import Internal
from worker.execution.sidecar_run import RunOutcome, judge, read_report, wait_or_cancel
from worker.pool.agent_socket import ACK_DEADLINE_S, connect_agent
from worker.pool.sidecar_pool import Sidecar
from worker.runner_contract import ActionDir, RunRequest
from worker.runtime.protocol import ContainerNotRunning

__all__ = ["ACK_DEADLINE_S", "AgentRun", "connect_agent"]

log = logging.getLogger(__name__)


class AgentRun:
    """Runs an action through a sidecar's agent; the same contract as SidecarRun.run."""

    async def run(
        self,
        sidecar: Sidecar,
        action: ActionDir,
        request: RunRequest,
        env: dict[str, str],
        timeout_s: float,
        cancelled: asyncio.Event,
    ) -> RunOutcome:
        """Raises ContainerNotRunning if the agent cannot take the action (the caller may
        retry in another sidecar); otherwise returns how the action ended."""
        assert sidecar.agent_socket is not None
        reader, writer = await connect_agent(sidecar.agent_socket, sidecar.agent_secret)
        try:
            writer.write(request.agent_message(env))
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), ACK_DEADLINE_S)
        except (OSError, TimeoutError) as error:
            writer.close()
            raise ContainerNotRunning(
                f"the sidecar's agent did not take the action ({error})"
            ) from None
        if answer.startswith(b"error "):
            # The request itself was refused: a bug of ours (check_command keeps out what the
            # agent would refuse), not a broken sidecar; the action is not run.
            writer.close()
            raise Internal(f"the sidecar's agent refused the request: {answer[:200]!r}")
        if answer != b"ack\n":
            writer.close()
            raise ContainerNotRunning(f"the sidecar's agent refused the action: {answer[:200]!r}")
        try:
            code = await self._wait(reader, writer, timeout_s, cancelled)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if code is None:
            if cancelled.is_set():
                return RunOutcome(kind="cancelled", code=-1, detail="agent lost")
            log.warning("agent of sidecar %s ended without an answer", sidecar.short_id)
            return RunOutcome(kind="lost", code=-1, detail="the agent ended without an answer")
        if code < 0:
            return RunOutcome(kind="timeout", code=-1, detail="the agent did not answer in time")
        report = await anyio.to_thread.run_sync(read_report, action)
        return judge(report, code, request)

    @staticmethod
    async def _wait(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout_s: float,
        cancelled: asyncio.Event,
    ) -> int | None:
        """The runner's exit code from `done CODE`; None if the connection ended without it,
        -1 if nothing came within the timeout and its grace."""

        async def hang_up() -> None:
            with contextlib.suppress(OSError):
                writer.write_eof()  # the agent's handler takes this as a cancel

        finished = asyncio.ensure_future(reader.readline())
        if not await wait_or_cancel(finished, cancelled, timeout_s, hang_up):
            return -1
        try:
            line = finished.result()
        except OSError:
            return None
        word, _, number = line.decode(errors="replace").strip().partition(" ")
        if word != "done" or not number.isdigit():
            return None
        return int(number)
