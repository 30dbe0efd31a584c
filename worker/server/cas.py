"""ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc

from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import OK_STATUS, InvalidArgument, NotFound, ServiceError, to_status_proto
from worker.reapi import re_grpc, re_pb2
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]

GET_TREE_DEFAULT_PAGE = 1000


def _check_batch_size(total: int, limit: int) -> None:
    if total > limit:
        raise InvalidArgument(
            f"batch of {total} bytes exceeds max_batch_total_size_bytes ({limit}); "
            "use ByteStream for large blobs"
        )


class ContentAddressableStorageServicer(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, store: DiskBlobStore, max_batch_total_size_bytes: int) -> None:
        self._store = store
        self._max_batch = max_batch_total_size_bytes

    @rpc_errors
    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: Context
    ) -> re_pb2.FindMissingBlobsResponse:
        digests = [Digest.from_proto(d) for d in request.blob_digests]
        missing = self._store.find_missing(digests)
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[d.to_proto() for d in missing])

    @rpc_errors
    async def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: Context
    ) -> re_pb2.BatchUpdateBlobsResponse:
        _check_batch_size(sum(len(r.data) for r in request.requests), self._max_batch)
        return await anyio.to_thread.run_sync(self._update_all, request)

    def _update_all(
        self, request: re_pb2.BatchUpdateBlobsRequest
    ) -> re_pb2.BatchUpdateBlobsResponse:
        response = re_pb2.BatchUpdateBlobsResponse()
        for item in request.requests:
            try:
                self._store.put(Digest.from_proto(item.digest), item.data)
                status = OK_STATUS
            except ServiceError as error:
                status = to_status_proto(error)
            response.responses.add(digest=item.digest, status=status)
        return response

    @rpc_errors
    async def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: Context
    ) -> re_pb2.BatchReadBlobsResponse:
        digests = [Digest.from_proto(d) for d in request.digests]
        _check_batch_size(sum(d.size for d in digests), self._max_batch)
        return await anyio.to_thread.run_sync(self._read_all, digests)

    def _read_all(self, digests: list[Digest]) -> re_pb2.BatchReadBlobsResponse:
        response = re_pb2.BatchReadBlobsResponse()
        for digest in digests:
            try:
                data = self._store.read(digest)
                response.responses.add(digest=digest.to_proto(), data=data, status=OK_STATUS)
            except ServiceError as error:
                response.responses.add(digest=digest.to_proto(), status=to_status_proto(error))
        return response

    @rpc_errors
    async def GetTree(
        self, request: re_pb2.GetTreeRequest, context: Context
    ) -> AsyncIterator[re_pb2.GetTreeResponse]:
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        page_size = request.page_size or GET_TREE_DEFAULT_PAGE
        start = _decode_page_token(request.page_token)
        root = Digest.from_proto(request.root_digest)
        directories = await anyio.to_thread.run_sync(self._walk, root, start + page_size)
        page = directories[start : start + page_size]
        more = len(directories) > start + page_size
        token = _encode_page_token(start + page_size) if more else ""
        yield re_pb2.GetTreeResponse(directories=page, next_page_token=token)

    def _walk(self, root: Digest, limit: int) -> list[re_pb2.Directory]:
        """Breadth-first Directory messages under root, up to limit + 1 (to know if more exist)."""
        try:
            found = [re_pb2.Directory.FromString(self._store.read(root))]
        except NotFound:
            raise NotFound(f"root directory {root} is not in the CAS") from None
        index = 0
        while index < len(found) and len(found) <= limit:
            for child in found[index].directories:
                try:
                    data = self._store.read(Digest.from_proto(child.digest))
                except NotFound:
                    continue  # The spec leaves missing subtrees out of the answer.
                found.append(re_pb2.Directory.FromString(data))
            index += 1
        return found


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "offset" and value.isdigit():
            return int(value)
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument(f"page_token {token!r} was not issued by this server")
