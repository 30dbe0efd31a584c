"""The admin gRPC server on admin.listen: a unix socket (root only) or a HOST:PORT, never the
REAPI port."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from worker.admin.servicer import AdminServicer
from worker.reapi import admin_pb2_grpc

log = logging.getLogger(__name__)

# The longest path a unix socket address holds (sun_path, less its terminating NUL).
MAX_SOCKET_PATH = 107


def _unix_path(address: str) -> Path | None:
    if address.startswith("unix://"):
        return Path(address.removeprefix("unix://"))
    if address.startswith("unix:"):
        return Path(address.removeprefix("unix:"))
    return None


def _private_directory(socket: Path) -> str:
    """Removes a socket left at `socket` (the data directory is locked by this service: one
    there is a leftover) and makes a fresh 0700 directory next to it."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(socket).st_mode):
            os.unlink(socket)
    return tempfile.mkdtemp(prefix=".", dir=socket.parent)


class AdminServer:
    def __init__(
        self,
        address: str,
        servicer: AdminServicer,
        interceptors: list[object] | None = None,
        health: HealthServicer | None = None,
    ) -> None:
        """`health` is the REAPI port's own health servicer, served here too, so an operator
        sees the same SERVING / NOT_SERVING (daemon away, exec root unusable) on this socket."""
        self.address = address
        self._server = grpc.aio.server(interceptors=interceptors)  # type: ignore[arg-type]
        admin_pb2_grpc.add_AdminServicer_to_server(servicer, self._server)
        if health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(health, self._server)
        self._socket = _unix_path(address)

    async def start(self) -> None:
        if self._socket is None:
            port = self._bind(self.address)
            if port == 0:
                raise OSError(f"cannot listen on admin address {self.address}")
            await self._server.start()
        else:
            await self._start_on_socket(self._socket)
        log.info("admin interface on %s", self.address)

    async def _start_on_socket(self, socket: Path) -> None:
        """Binds in a fresh root-only (0700) directory, makes the socket 0600 and only then
        links it into place: nobody but root may connect while it is set up. (Not by the
        umask, which is the whole process's: CAS threads writing blobs meanwhile would make
        them unreadable to actions.)"""
        private = _private_directory(socket)
        bound = os.path.join(private, "s")
        try:
            if len(os.fsencode(bound)) > MAX_SOCKET_PATH:
                longest = MAX_SOCKET_PATH - (len(os.fsencode(bound)) - len(os.fsencode(socket)))
                raise OSError(
                    f"admin socket path {socket} is longer than {longest} bytes; set "
                    "admin.listen to a shorter unix:PATH"
                )
            if self._bind(f"unix:{bound}") == 0:
                raise OSError(f"cannot listen on admin address {self.address}")
            await self._server.start()
            os.chmod(bound, 0o600)
            os.link(bound, socket)  # never replaces a file that is there
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(bound)
            os.rmdir(private)

    def _bind(self, address: str) -> int:
        try:
            return self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot listen on admin address {address}: {error}") from None

    async def stop(self) -> None:
        await self._server.stop(1.0)
        if self._socket is not None and self._socket.is_socket():
            self._socket.unlink()
