"""The Admin gRPC servicer: a thin adapter over SidecarPools and the ExecutionService."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import empty_pb2

from worker.admin.views import operation_view, pool_view
from worker.errors import FailedPrecondition
from worker.execution.service import ExecutionService
from worker.pool.pools import SidecarPools
from worker.reapi import admin_pb2, admin_pb2_grpc
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, pools: SidecarPools | None, service: ExecutionService | None) -> None:
        self._pools_or_none = pools
        self._service_or_none = service

    @property
    def _pools(self) -> SidecarPools:
        if self._pools_or_none is None:
            raise FailedPrecondition("execution is disabled on this worker: it has no pools")
        return self._pools_or_none

    @property
    def _service(self) -> ExecutionService:
        if self._service_or_none is None:
            raise FailedPrecondition("execution is disabled on this worker: no operations")
        return self._service_or_none

    @rpc_errors
    async def ListPools(
        self, request: admin_pb2.ListPoolsRequest, context: Context
    ) -> admin_pb2.ListPoolsResponse:
        pools = [pool_view(p) for p in self._pools.pools]
        pools += [pool_view(p, winding_down=True) for p in self._pools.retiring_pools]
        return admin_pb2.ListPoolsResponse(pools=pools)

    @rpc_errors
    async def ScalePool(
        self, request: admin_pb2.ScalePoolRequest, context: Context
    ) -> admin_pb2.ScalePoolResponse:
        settings = await self._pools.scale(
            request.image,
            min_idle=request.min_idle if request.HasField("min_idle") else None,
            max_sidecars=request.max_sidecars if request.HasField("max_sidecars") else None,
            idle_ttl_s=request.idle_ttl_s if request.HasField("idle_ttl_s") else None,
        )
        return admin_pb2.ScalePoolResponse(
            min_idle=settings.min_idle,
            max_sidecars=settings.max_sidecars,
            idle_ttl_s=settings.idle_ttl_s,
        )

    @rpc_errors
    async def DrainPool(
        self, request: admin_pb2.PoolRequest, context: Context
    ) -> admin_pb2.PoolChangeResponse:
        return admin_pb2.PoolChangeResponse(pools=await self._pools.drain(request.image))

    @rpc_errors
    async def RecyclePool(
        self, request: admin_pb2.PoolRequest, context: Context
    ) -> admin_pb2.PoolChangeResponse:
        pools = len(self._pools.find(request.image))
        retired = await self._pools.recycle(request.image)
        return admin_pb2.PoolChangeResponse(pools=pools, sidecars=retired)

    @rpc_errors
    async def RefreshPool(
        self, request: admin_pb2.PoolRequest, context: Context
    ) -> admin_pb2.RefreshPoolResponse:
        before, image_id = await self._pools.refresh(request.image)
        return admin_pb2.RefreshPoolResponse(previous_image_ids=before, image_id=image_id)

    @rpc_errors
    async def ListOperations(
        self, request: admin_pb2.ListOperationsRequest, context: Context
    ) -> admin_pb2.ListOperationsResponse:
        states, following = self._service.operations.page(request.page_size, request.page_token)
        return admin_pb2.ListOperationsResponse(
            operations=[operation_view(s) for s in states], next_page_token=following
        )

    @rpc_errors
    async def CancelOperation(
        self, request: admin_pb2.CancelOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        self._service.cancel(request.name)
        log.info("operator: cancelled %s", request.name)
        return empty_pb2.Empty()
