"""Worker mode serves gRPC health for the pod's probes (deploy/kubernetes/overlays/scale-out):
liveness at once, readiness only while the bot takes leases."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from worker.app import LIVENESS
from worker.bots.health import HealthPort

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(answer.status)


@pytest.mark.anyio
async def test_liveness_at_once_readiness_while_taking_leases() -> None:
    health = HealthPort("127.0.0.1:0")
    await health.start()
    try:
        assert await status(health.port, LIVENESS) == SERVING
        assert await status(health.port, "") == NOT_SERVING  # execution not started yet
        await health.ready(True)
        assert await status(health.port, "") == SERVING
        await health.ready(False)  # SIGTERM: no more leases
        assert await status(health.port, "") == NOT_SERVING
        assert await status(health.port, LIVENESS) == SERVING
    finally:
        await health.stop()
