"""The admin gRPC server on admin.listen: a unix socket (root only) or a HOST:PORT, never the
REAPI port."""

from __future__ import annotations

import logging
import os
import stat
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
        if self._socket is not None:
            # The data directory is locked by this service: a socket there is a leftover.
            if self._socket.is_socket() or (
                self._socket.exists() and stat.S_ISSOCK(os.lstat(self._socket).st_mode)
            ):
                self._socket.unlink()
            # Nobody but root may even connect while the socket is being set up.
            if len(os.fsencode(self._socket)) > MAX_SOCKET_PATH:
                raise OSError(
                    f"admin socket path {self._socket} is longer than {MAX_SOCKET_PATH} bytes; "
                    "set admin.listen to a shorter unix:PATH"
                )
            old_mask = os.umask(0o177)
            try:
                port = self._bind(f"unix:{self._socket}")
            finally:
                os.umask(old_mask)
        else:
            port = self._bind(self.address)
        if port == 0:
            raise OSError(f"cannot listen on admin address {self.address}")
        await self._server.start()
        if self._socket is not None:
            os.chmod(self._socket, 0o600)
        log.info("admin interface on %s", self.address)

    def _bind(self, address: str) -> int:
        try:
            return self._server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot listen on admin address {address}: {error}") from None

    async def stop(self) -> None:
        await self._server.stop(1.0)
        if self._socket is not None and self._socket.is_socket():
            self._socket.unlink()
