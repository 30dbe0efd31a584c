"""Execution (Execute, WaitExecution) and Operations (Get, List, Cancel, Delete) servicers.

Operation names are capabilities: `operations/` and a random UUID, handed only to the client
whose Execute created (or joined) the operation. Whoever holds a name can follow, cancel or
delete that operation; an unknown name is NOT_FOUND. Nothing on the public port lists names.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2

from worker.digests import Digest
from worker.errors import PermissionDenied
from worker.execution.operations import OperationState
from worker.execution.service import ExecutionService
from worker.reapi import ops_grpc, ops_pb2, re_grpc, re_pb2
from worker.server.rpc_errors import rpc_errors

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# A client that drops every stream of an operation (and does not come back with
# WaitExecution within this time) no longer wants it: it is cancelled.
ABANDON_GRACE_S = 5.0


class OperationFollower:
    """Streams an operation's updates and cancels operations that every client abandoned."""

    def __init__(self, service: ExecutionService, grace_s: float = ABANDON_GRACE_S) -> None:
        self._service = service
        self._grace_s = grace_s

    async def follow(self, state: OperationState) -> AsyncGenerator[ops_pb2.Operation, None]:
        state.watchers += 1
        try:
            async for operation in state.updates():
                yield operation
        finally:
            state.watchers -= 1
            if not state.done and state.watchers == 0:
                asyncio.get_running_loop().call_later(
                    self._grace_s, self._cancel_if_abandoned, state
                )

    def _cancel_if_abandoned(self, state: OperationState) -> None:
        """Runs in a timer callback, where an exception would only be logged by the loop:
        it works on the state itself (its name may have been deleted meanwhile) and never
        raises."""
        if state.done or state.watchers > 0:
            return
        try:
            self._service.cancel_state(state)
        except Exception:
            log.exception("could not cancel abandoned operation %s", state.name)


class ExecutionServicer(re_grpc.ExecutionServicer):
    def __init__(self, service: ExecutionService) -> None:
        self._service = service
        self._follower = OperationFollower(service)

    @rpc_errors
    async def Execute(
        self, request: re_pb2.ExecuteRequest, context: Context
    ) -> AsyncIterator[ops_pb2.Operation]:
        state = await self._service.execute(
            Digest.from_proto(request.action_digest),
            skip_cache_lookup=request.skip_cache_lookup,
            priority=request.execution_policy.priority,
        )
        async for operation in self._follower.follow(state):
            yield operation

    @rpc_errors
    async def WaitExecution(
        self, request: re_pb2.WaitExecutionRequest, context: Context
    ) -> AsyncIterator[ops_pb2.Operation]:
        state = self._service.operations.get(request.name)
        async for operation in self._follower.follow(state):
            yield operation


class OperationsServicer(ops_grpc.OperationsServicer):
    """google.longrunning.Operations on the public port, for names the caller was given.

    REAPI `Execute`: "The server NEED NOT implement other methods or functionality of the
    Operations API." Get, Cancel and Delete take a name and answer NOT_FOUND for one this
    server does not know. ListOperations is refused with PERMISSION_DENIED whatever its
    `name`, `filter`, `page_size` or `page_token`: it would hand every client the names (and
    so the power to cancel) of everyone's operations. Listing, and cancelling any operation,
    are operator functions of the admin interface on its own address (worker/admin/,
    `sidecar-executor operations list|cancel`), so `filter` is not implemented here.
    """

    def __init__(self, service: ExecutionService) -> None:
        self._service = service

    @rpc_errors
    async def GetOperation(
        self, request: ops_pb2.GetOperationRequest, context: Context
    ) -> ops_pb2.Operation:
        return self._service.operations.get(request.name).to_proto()

    @rpc_errors
    async def ListOperations(
        self, request: ops_pb2.ListOperationsRequest, context: Context
    ) -> ops_pb2.ListOperationsResponse:
        raise PermissionDenied(
            "listing operations is an operator function and is not offered on this port; "
            "use the operation names your Execute calls returned"
        )

    @rpc_errors
    async def CancelOperation(
        self, request: ops_pb2.CancelOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        self._service.cancel(request.name)
        return empty_pb2.Empty()

    @rpc_errors
    async def DeleteOperation(
        self, request: ops_pb2.DeleteOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        self._service.delete(request.name)
        return empty_pb2.Empty()
