"""The worker mode's only server: gRPC health on `server.listen`, for the pod's probes.

`liveness` answers SERVING as long as the process runs; "" (readiness) is SERVING once the
execution side is ready (daemon reached, leftovers removed) and NOT_SERVING again from the
moment the bot stops taking leases. Nothing else is served: the work arrives as leases."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from worker.app import LIVENESS  # one probe spec fits both `serve` and `worker`

log = logging.getLogger(__name__)


class HealthPort:
    def __init__(self, listen: str) -> None:
        self._listen = listen
        self._health = HealthServicer()
        self._server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = 0

    async def start(self) -> None:
        self.port = self._server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen} (server.listen) for health")
        await self._server.start()
        log.info("health on %s:%d", self._listen.rpartition(":")[0], self.port)
        await self._health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    async def ready(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        await self._health.set("", status)

    async def stop(self) -> None:
        await self._server.stop(1)
