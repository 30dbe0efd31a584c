"""ByteStream: chunked reads with offset and limit, resumable verified writes, QueryWriteStatus.

Disk work (opening blobs, appending chunks, finishing uploads) runs in worker threads, never
on the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc

from worker.cas.disk_store import DiskBlobStore
from worker.cas.uploads import PartialUpload, UploadEnded, UploadTracker
from worker.errors import InvalidArgument, OutOfRange
from worker.reapi import bs_grpc, bs_pb2
from worker.resources import parse_read_resource, parse_write_resource
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]

READ_CHUNK_BYTES = 1 << 20
# Chunks of one Write stream are gathered up to this size before they go to disk: one worker
# thread call and one open/write/close per megabyte, not per (often 16 KiB) message. What is
# gathered but not yet written is lost if the stream breaks; ByteStream allows that, the
# committed size "may be less than the amount of data the client previously sent".
FLUSH_BYTES = 1 << 20


class _Pending:
    """Data one Write stream sent that is not yet appended, starting at `offset`."""

    def __init__(self) -> None:
        self.offset = 0
        self.size = 0
        self._chunks: list[bytes] = []

    @property
    def end(self) -> int:
        return self.offset + self.size

    def add(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def take(self) -> tuple[int, bytes]:
        offset, data = self.offset, b"".join(self._chunks)
        self.offset, self.size, self._chunks = self.end, 0, []
        return offset, data


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
        stream = await anyio.to_thread.run_sync(self._store.open, digest)
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
        pending = _Pending()
        async for request in request_iterator:
            check_now = upload is None  # the first offset is checked at once
            if upload is None:
                resource = parse_write_resource(request.resource_name)
                if await anyio.to_thread.run_sync(self._store.contains, resource.digest):
                    # Already stored: REAPI lets us end the stream at once with the full size.
                    return bs_pb2.WriteResponse(committed_size=resource.digest.size)
                upload = await anyio.to_thread.run_sync(
                    self._uploads.begin, resource.upload_id, resource.digest
                )
                pending.offset = request.write_offset
            elif request.resource_name:
                again = parse_write_resource(request.resource_name)
                if (again.upload_id, again.digest) != (upload.upload_id, upload.digest):
                    raise InvalidArgument("resource_name changed in the middle of a write")
            if request.write_offset != pending.end:
                # Not where this stream left off: write what it sent so far, then let the
                # tracker judge the new offset at once.
                if pending.size and (done := await self._flush(upload, pending, finish=False)):
                    return done
                pending.offset = request.write_offset
                check_now = True
            pending.add(request.data)
            if (
                check_now
                or request.finish_write
                or pending.size >= FLUSH_BYTES
                or pending.end > upload.digest.size  # refused at once
            ):
                if done := await self._flush(upload, pending, request.finish_write):
                    return done
        if upload is None:
            raise InvalidArgument("write stream ended before its first message")
        if pending.size and (done := await self._flush(upload, pending, finish=False)):
            return done
        raise InvalidArgument(
            f"write stream ended without finish_write after {upload.committed} bytes; "
            "resume it from QueryWriteStatus"
        )

    async def _flush(
        self, upload: PartialUpload, pending: _Pending, finish: bool
    ) -> bs_pb2.WriteResponse | None:
        """Appends what the stream sent since the last flush, in one worker thread call, and
        finishes the upload if asked; a response means the stream is done."""
        offset, data = pending.take()
        try:
            await anyio.to_thread.run_sync(self._write, upload, offset, data, finish)
        except UploadEnded:
            # Another stream of this upload finished it (REAPI: "the request will
            # terminate immediately with a response whose committed_size is the full
            # size"), or dropped it, which leaves this stream nothing to continue.
            if await anyio.to_thread.run_sync(self._store.contains, upload.digest):
                return bs_pb2.WriteResponse(committed_size=upload.digest.size)
            raise
        return bs_pb2.WriteResponse(committed_size=upload.digest.size) if finish else None

    def _write(self, upload: PartialUpload, offset: int, data: bytes, finish: bool) -> None:
        self._uploads.append(upload, offset, data)
        if finish:
            self._uploads.finish(upload)

    @rpc_errors
    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: Context
    ) -> bs_pb2.QueryWriteStatusResponse:
        resource = parse_write_resource(request.resource_name)
        if await anyio.to_thread.run_sync(self._store.contains, resource.digest):
            return bs_pb2.QueryWriteStatusResponse(
                committed_size=resource.digest.size, complete=True
            )
        committed = self._uploads.committed_size(resource.upload_id, resource.digest)
        return bs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)
