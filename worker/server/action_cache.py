"""ActionCache: GetActionResult (with inlining on request) and UpdateActionResult."""

from __future__ import annotations

from typing import Any

import anyio
import grpc

from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.reapi import re_grpc, re_pb2
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]

# Inlined bytes per response stay well under the gRPC message limit.
INLINE_BUDGET_BYTES = 1 << 20


def inline_outputs(
    result: re_pb2.ActionResult,
    store: DiskBlobStore,
    request: re_pb2.GetActionResultRequest,
) -> None:
    """Fills stdout_raw, stderr_raw and OutputFile.contents as asked, within a byte budget."""
    budget = INLINE_BUDGET_BYTES
    if request.inline_stdout and result.HasField("stdout_digest"):
        if result.stdout_digest.size_bytes <= budget:
            result.stdout_raw = store.read(Digest.from_proto(result.stdout_digest))
            budget -= result.stdout_digest.size_bytes
    if request.inline_stderr and result.HasField("stderr_digest"):
        if result.stderr_digest.size_bytes <= budget:
            result.stderr_raw = store.read(Digest.from_proto(result.stderr_digest))
            budget -= result.stderr_digest.size_bytes
    wanted = set(request.inline_output_files)
    for output in result.output_files:
        if output.path in wanted and output.digest.size_bytes <= budget:
            output.contents = store.read(Digest.from_proto(output.digest))
            budget -= output.digest.size_bytes


class ActionCacheServicer(re_grpc.ActionCacheServicer):
    def __init__(self, cache: DiskActionCache, store: DiskBlobStore) -> None:
        self._cache = cache
        self._store = store

    @rpc_errors
    async def GetActionResult(
        self, request: re_pb2.GetActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        action_digest = Digest.from_proto(request.action_digest)
        result = await anyio.to_thread.run_sync(self._cache.get, action_digest)
        if request.inline_stdout or request.inline_stderr or request.inline_output_files:
            await anyio.to_thread.run_sync(inline_outputs, result, self._store, request)
        return result

    @rpc_errors
    async def UpdateActionResult(
        self, request: re_pb2.UpdateActionResultRequest, context: Context
    ) -> re_pb2.ActionResult:
        action_digest = Digest.from_proto(request.action_digest)
        await anyio.to_thread.run_sync(self._cache.put, action_digest, request.action_result)
        return request.action_result
