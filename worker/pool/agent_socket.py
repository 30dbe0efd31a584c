"""Connects to a sidecar's agent and checks that it is ours (the greeting with the one-time
secret). The pools use it to wait for a new sidecar's agent; dispatch `agent` to send actions."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from worker.runner_contract import AGENT_PROTOCOL
from worker.runtime.protocol import ContainerNotRunning

# A live agent greets and acknowledges within microseconds; a stopped one (SIGSTOP) still has
# its socket accept connections, so silence past this means the sidecar is given up.
ACK_DEADLINE_S = 5.0


async def connect_agent(
    socket_path: Path, secret: str, deadline_s: float = ACK_DEADLINE_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the agent, once it has proved who it is; raises ContainerNotRunning
    if nothing answers, or something that is not our agent does."""
    try:
        reader, writer = await asyncio.wait_for(_open(socket_path), deadline_s)
    except (OSError, TimeoutError) as error:
        raise ContainerNotRunning(f"the sidecar's agent does not answer ({error})") from None
    try:
        greeting = await asyncio.wait_for(reader.readline(), deadline_s)
    except (OSError, TimeoutError) as error:
        writer.close()
        raise ContainerNotRunning(f"the sidecar's agent did not greet ({error})") from None
    except BaseException:  # cancelled (an early connection abandoned): not left to the GC
        writer.close()
        raise
    if greeting != f"{AGENT_PROTOCOL} {secret}\n".encode():
        writer.close()
        raise ContainerNotRunning("the sidecar's socket is not served by its agent")
    return reader, writer


async def _open(socket_path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connects through a handle on the socket's directory: a unix socket's path may be at
    most 107 bytes, and a data directory can sit deeper than that leaves room for."""
    directory = os.open(socket_path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(
            sock, f"/proc/self/fd/{directory}/{socket_path.name}"
        )
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(directory)
    return await asyncio.open_unix_connection(sock=sock)
