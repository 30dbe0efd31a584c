"""ByteStream: chunked reads with offset and limit, resumable verified writes, QueryWriteStatus."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc

from worker.cas.disk_store import DiskBlobStore
from worker.cas.uploads import PartialUpload, UploadTracker
from worker.errors import InvalidArgument, OutOfRange
from worker.reapi import bs_grpc, bs_pb2
from worker.resources import parse_read_resource, parse_write_resource
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]

READ_CHUNK_BYTES = 1 << 20


class ByteStreamServicer(bs_grpc.ByteStreamServicer):
    def __init__(self, store: DiskBlobStore, uploads: UploadTracker) -> None:
        self._store = store
        self._uploads = uploads

    @rpc_errors
    async def Read(
        self, request: bs_pb2.ReadRequest, context: Context
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        digest = parse_read_resource(request.resource_name).digest
        if request.read_offset < 0 or request.read_offset > digest.size:
            raise OutOfRange(f"read_offset {request.read_offset} is outside blob {digest}")
        if request.read_limit < 0:
            raise InvalidArgument(f"read_limit {request.read_limit} is negative")
        remaining = digest.size - request.read_offset
        if request.read_limit:
            remaining = min(remaining, request.read_limit)
        stream = self._store.open(digest)
        try:
            stream.seek(request.read_offset)
            while remaining > 0:
                chunk = await anyio.to_thread.run_sync(
                    stream.read, min(READ_CHUNK_BYTES, remaining)
                )
                if not chunk:
                    break
                remaining -= len(chunk)
                yield bs_pb2.ReadResponse(data=chunk)
        finally:
            stream.close()

    @rpc_errors
    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        # An interrupted stream leaves its partial upload in the tracker, so the
        # client can resume from the size QueryWriteStatus reports.
        upload: PartialUpload | None = None
        async for request in request_iterator:
            if upload is None:
                resource = parse_write_resource(request.resource_name)
                if request.write_offset == 0 and self._store.contains(resource.digest):
                    # Already stored: the spec lets us end the stream at once.
                    return bs_pb2.WriteResponse(committed_size=resource.digest.size)
                upload = self._uploads.begin(resource.upload_id, resource.digest)
            elif request.resource_name and (
                parse_write_resource(request.resource_name).digest != upload.digest
            ):
                raise InvalidArgument("resource_name changed in the middle of a write")
            self._uploads.append(upload, request.write_offset, request.data)
            if request.finish_write:
                size = upload.committed
                await anyio.to_thread.run_sync(self._uploads.finish, upload)
                return bs_pb2.WriteResponse(committed_size=size)
        if upload is None:
            raise InvalidArgument("write stream ended before its first message")
        raise InvalidArgument(
            f"write stream ended without finish_write after {upload.committed} bytes; "
            "resume it from QueryWriteStatus"
        )

    @rpc_errors
    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: Context
    ) -> bs_pb2.QueryWriteStatusResponse:
        resource = parse_write_resource(request.resource_name)
        if self._store.contains(resource.digest):
            return bs_pb2.QueryWriteStatusResponse(
                committed_size=resource.digest.size, complete=True
            )
        committed = self._uploads.committed_size(resource.upload_id, resource.digest)
        return bs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)
