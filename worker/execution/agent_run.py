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
from dataclasses import dataclass
from pathlib import Path

import anyio

from worker.errors import Internal
from worker.execution.sidecar_run import RunOutcome, judge, read_report, wait_or_cancel
from worker.pool.agent_socket import ACK_DEADLINE_S, connect_agent
from worker.pool.sidecar_pool import Sidecar
from worker.runner_contract import ActionDir, RunRequest
from worker.runtime.protocol import ContainerNotRunning

__all__ = ["ACK_DEADLINE_S", "AgentRun", "connect_agent"]

log = logging.getLogger(__name__)

# An agent's handler waits 5 s for the request after its greeting (sidecar/runner.c,
# AGENT_REQUEST_DEADLINE_MS); a connection made before staging is used only if younger.
FRESH_CONNECTION_S = 2.0


@dataclass
class AgentConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened_at: float


class AgentRun:
    """Runs an action through a sidecar's agent; the same contract as SidecarRun.run."""

    def connect_soon(self, sidecar: Sidecar) -> asyncio.Task[AgentConnection]:
        """Starts connecting to the sidecar's agent, so that the greeting overlaps staging;
        give the task to run(), or to abandon() if the action will not run."""
        assert sidecar.agent_socket is not None
        return asyncio.ensure_future(self._connect(sidecar.agent_socket, sidecar.agent_secret))

    @staticmethod
    async def _connect(socket_path: Path, secret: str) -> AgentConnection:
        reader, writer = await connect_agent(socket_path, secret)
        return AgentConnection(reader, writer, asyncio.get_running_loop().time())

    @staticmethod
    def abandon(connecting: asyncio.Task[AgentConnection]) -> None:
        """Drops a connection that connect_soon() started, whether or not it was made."""

        def close(task: asyncio.Task[AgentConnection]) -> None:
            if not task.cancelled() and task.exception() is None:
                task.result().writer.close()

        connecting.cancel()
        connecting.add_done_callback(close)

    async def _connection(
        self, sidecar: Sidecar, connecting: asyncio.Task[AgentConnection] | None
    ) -> AgentConnection:
        """The connection started early, unless it has sat so long that the agent's handler
        may have stopped waiting for the request; then a new one."""
        if connecting is not None:
            made = await connecting
            if asyncio.get_running_loop().time() - made.opened_at < FRESH_CONNECTION_S:
                return made
            made.writer.close()
        assert sidecar.agent_socket is not None
        return await self._connect(sidecar.agent_socket, sidecar.agent_secret)

    async def run(
        self,
        sidecar: Sidecar,
        action: ActionDir,
        request: RunRequest,
        env: dict[str, str],
        timeout_s: float,
        cancelled: asyncio.Event,
        connecting: asyncio.Task[AgentConnection] | None = None,
    ) -> RunOutcome:
        """Raises ContainerNotRunning if the agent cannot take the action (the caller may
        retry in another sidecar); otherwise returns how the action ended."""
        connection = await self._connection(sidecar, connecting)
        reader, writer = connection.reader, connection.writer
        try:
            writer.write(request.agent_message(env))
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), ACK_DEADLINE_S)
        except (OSError, TimeoutError) as error:
            writer.close()
            raise ContainerNotRunning(
                f"the sidecar's agent did not take the action ({error})"
            ) from None
        except BaseException:  # cancelled: hanging up is the agent's cancel too
            writer.close()
            raise
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
