"""ByteStream: chunked reads with offset and limit, resumable verified writes, QueryWriteStatus.

Disk work (opening blobs, appending chunks, finishing uploads) runs in the CAS's worker
threads (worker.cas.io_threads), never on the event loop. A small blob sent or read whole
costs one thread call; a large stream keeps one disk call in flight while the next message
travels, so the disk and the network work at the same time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from worker.cas import io_threads
from worker.cas.disk_store import DiskBlobStore
from worker.cas.reader import BlobReader
from worker.cas.uploads import PartialUpload, UploadEnded, UploadTracker
from worker.digests import Digest
from worker.errors import InvalidArgument, OutOfRange
from worker.reapi import bs_pb2
from worker.resources import WriteResource, parse_read_resource, parse_write_resource
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]

# Read responses carry this much. Measured against a bare grpc.aio server on this machine,
# 1 MiB messages streamed about twice as fast as 2 or 3 MiB ones (and clients accept 4 MiB
# messages by default, so this stays well below that).
READ_CHUNK_BYTES = 1 << 20
_READ_DATA_TAG = bytes([10 << 3 | 2])  # ReadResponse.data: field 10, length delimited
SERVICE = bs_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name
# Chunks of one Write stream are gathered up to this size before they go to disk: one worker
# thread call and one open/write/close per megabyte, not per (often 16 KiB) message. What is
# gathered but not yet written is lost if the stream breaks; ByteStream allows that, the
# committed size "may be less than the amount of data the client previously sent".
FLUSH_BYTES = 1 << 20
# While one append is on its way to disk, the stream goes on receiving and hands what came
# over in one call once the disk is free, so a slow write does not hold up the client at once;
# what is gathered and what is in flight stay under this much together (plus one message), so
# a stream holds a bounded amount of memory.
BUFFER_BYTES = 8 << 20
# What one gathered message costs in memory beyond its bytes (a bytes object and its place
# in a list, rounded up): counted, so that a stream of tiny messages is bounded in memory,
# not only in payload.
MESSAGE_OVERHEAD_BYTES = 64


class _Pending:
    """Data one Write stream sent that is not yet appended, starting at `offset`."""

    def __init__(self) -> None:
        self.offset = 0
        self.size = 0
        self._chunks: list[bytes] = []

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def memory(self) -> int:
        """Roughly what the gathered messages take in memory."""
        return self.size + MESSAGE_OVERHEAD_BYTES * len(self._chunks)

    def add(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def take(self) -> tuple[int, bytes]:
        offset, data = self.offset, b"".join(self._chunks)
        self.offset, self.size, self._chunks = self.end, 0, []
        return offset, data


class ByteStreamServicer:
    """ByteStream for the CAS; served with add_to_server (Read yields encoded responses)."""

    def __init__(self, store: DiskBlobStore, uploads: UploadTracker) -> None:
        self._store = store
        self._uploads = uploads

    @rpc_errors
    async def Read(self, request: bs_pb2.ReadRequest, context: Context) -> AsyncIterator[bytes]:
        """Streams the blob in chunks of READ_CHUNK_BYTES, each response already encoded
        (encode_read_response, in the worker thread that read the chunk)."""
        digest = parse_read_resource(request.resource_name).digest
        if request.read_offset < 0 or request.read_offset > digest.size:
            raise OutOfRange(f"read_offset {request.read_offset} is outside blob {digest}")
        if request.read_limit < 0:
            raise InvalidArgument(f"read_limit {request.read_limit} is negative")
        opening = io_threads.submit(
            _open_reader, self._store, digest, request.read_offset, request.read_limit
        )
        try:
            reader, message = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The client went away while a thread opens the blob: what it opens is closed
            # when it is done (cancelled, it would be dropped with its file left open).
            opening.add_done_callback(_close_opened)
            raise
        ahead: asyncio.Future[bytes | None] | None = None
        try:
            while message is not None:
                ahead = None
                # Read the next chunk (and hash it) while this one is on its way.
                if reader.remaining:
                    ahead = io_threads.submit(_next_message, reader)
                    ahead.add_done_callback(_retrieve)
                yield message
                if ahead is None:
                    break
                message = await ahead
                ahead = None
        finally:
            if ahead is not None and not ahead.done():
                # Closing the file under a read in flight could hand its number to another.
                ahead.add_done_callback(lambda _: reader.close())
            else:
                reader.close()

    @rpc_errors
    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Context
    ) -> bs_pb2.WriteResponse:
        # An interrupted stream leaves its partial upload in the tracker, so the
        # client can resume from the size QueryWriteStatus reports.
        upload: PartialUpload | None = None
        pending = _Pending()
        behind: asyncio.Future[None] | None = None  # an append still in flight
        behind_bytes = 0  # and its size
        async for request in request_iterator:
            check_now = upload is None  # the first offset is checked at once
            if upload is None:
                resource = parse_write_resource(request.resource_name)
                size = resource.digest.size
                if request.finish_write and request.write_offset == 0 and len(request.data) == size:
                    # The whole blob in one message (every small blob): store it in one call.
                    await io_threads.run(self._put_whole, resource.digest, request.data)
                    return bs_pb2.WriteResponse(committed_size=size)
                upload = await io_threads.run(self._begin, resource)
                if upload is None:
                    # Already stored: REAPI lets us end the stream at once with the full size.
                    return bs_pb2.WriteResponse(committed_size=size)
                pending.offset = request.write_offset
            elif request.resource_name:
                again = parse_write_resource(request.resource_name)
                if (again.upload_id, again.digest) != (upload.upload_id, upload.digest):
                    raise InvalidArgument("resource_name changed in the middle of a write")
            if request.write_offset != pending.end:
                # Not where this stream left off: write what it sent so far, then let the
                # tracker judge the new offset at once.
                if behind is not None and (done := await self._settle(upload, behind)):
                    return done
                behind = None
                if pending.size and (done := await self._flush(upload, pending, finish=False)):
                    return done
                pending.offset = request.write_offset
                check_now = True
            pending.add(request.data)
            if check_now or request.finish_write or pending.end > upload.digest.size:
                if behind is not None and (done := await self._settle(upload, behind)):
                    return done
                behind = None
                if done := await self._flush(upload, pending, request.finish_write):
                    return done
            elif pending.memory >= FLUSH_BYTES and (
                behind is None or behind.done() or pending.memory + behind_bytes >= BUFFER_BYTES
            ):
                if behind is not None and (done := await self._settle(upload, behind)):
                    return done
                behind_bytes = pending.size
                # No local keeps the data: once written, the bytes can go.
                behind = io_threads.submit(self._write, upload, *pending.take(), False)
                behind.add_done_callback(_retrieve)
        if upload is None:
            raise InvalidArgument("write stream ended before its first message")
        if behind is not None and (done := await self._settle(upload, behind)):
            return done
        if pending.size and (done := await self._flush(upload, pending, finish=False)):
            return done
        raise InvalidArgument(
            f"write stream ended without finish_write after {upload.committed} bytes; "
            "resume it from QueryWriteStatus"
        )

    def _put_whole(self, digest: Digest, data: bytes) -> None:
        self._uploads.expire_if_due()
        self._store.put(digest, data)

    def _begin(self, resource: WriteResource) -> PartialUpload | None:
        """The partial upload to continue, or None if the blob is already stored."""
        if self._store.contains(resource.digest):
            return None
        return self._uploads.begin(resource.upload_id, resource.digest)

    async def _flush(
        self, upload: PartialUpload, pending: _Pending, finish: bool
    ) -> bs_pb2.WriteResponse | None:
        """Appends what the stream sent since the last flush, in one worker thread call, and
        finishes the upload if asked; a response means the stream is done."""
        offset, data = pending.take()
        if done := await self._settle(
            upload, io_threads.submit(self._write, upload, offset, data, finish)
        ):
            return done
        return bs_pb2.WriteResponse(committed_size=upload.digest.size) if finish else None

    async def _settle(
        self, upload: PartialUpload, append: asyncio.Future[None]
    ) -> bs_pb2.WriteResponse | None:
        """Waits for an append; a response means the stream is done."""
        try:
            await append
        except UploadEnded:
            # Another stream of this upload finished it (REAPI: "the request will
            # terminate immediately with a response whose committed_size is the full
            # size"), or dropped it, which leaves this stream nothing to continue.
            if await io_threads.run(self._store.contains, upload.digest):
                return bs_pb2.WriteResponse(committed_size=upload.digest.size)
            raise
        return None

    def _write(self, upload: PartialUpload, offset: int, data: bytes, finish: bool) -> None:
        self._uploads.append(upload, offset, data)
        if finish:
            self._uploads.finish(upload)

    @rpc_errors
    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: Context
    ) -> bs_pb2.QueryWriteStatusResponse:
        resource = parse_write_resource(request.resource_name)
        if await io_threads.run(self._store.contains, resource.digest):
            return bs_pb2.QueryWriteStatusResponse(
                committed_size=resource.digest.size, complete=True
            )
        committed = self._uploads.committed_size(resource.upload_id, resource.digest)
        return bs_pb2.QueryWriteStatusResponse(committed_size=committed, complete=False)


def _open_reader(
    store: DiskBlobStore, digest: Digest, offset: int, limit: int
) -> tuple[BlobReader, bytes | None]:
    """Opens a checked read and reads its first response, in one thread call."""
    reader = BlobReader(store, digest, offset, limit)
    try:
        return reader, _next_message(reader)
    except BaseException:
        reader.close()
        raise


def _close_opened(opening: asyncio.Future[tuple[BlobReader, bytes | None]]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[0].close()


def _next_message(reader: BlobReader) -> bytes | None:
    """The next ReadResponse of a read, encoded; None at the end."""
    chunk = reader.read(READ_CHUNK_BYTES)
    return encode_read_response(chunk) if chunk else None


def encode_read_response(data: bytes) -> bytes:
    """The wire form of ReadResponse(data=data): its one field, `data` (number 10, length
    delimited). Built directly, the chunk is copied once into the message; through a
    ReadResponse object it would be copied in and then out again."""
    if not data:
        return b""  # proto3 leaves an empty field out
    return _READ_DATA_TAG + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    encoded = bytearray()
    while n >= 0x80:
        encoded.append(n & 0x7F | 0x80)
        n >>= 7
    encoded.append(n)
    return bytes(encoded)


def _already_encoded(message: bytes) -> bytes:
    return message


def add_to_server(servicer: ByteStreamServicer, server: grpc.aio.Server) -> None:
    """Serves ByteStream as the generated add_ByteStreamServicer_to_server would, except
    that Read's responses are the bytes Read yields (encode_read_response)."""
    handlers = {
        "Read": grpc.unary_stream_rpc_method_handler(
            servicer.Read,
            request_deserializer=bs_pb2.ReadRequest.FromString,
            response_serializer=_already_encoded,
        ),
        "Write": grpc.stream_unary_rpc_method_handler(
            servicer.Write,
            request_deserializer=bs_pb2.WriteRequest.FromString,
            response_serializer=bs_pb2.WriteResponse.SerializeToString,
        ),
        "QueryWriteStatus": grpc.unary_unary_rpc_method_handler(
            servicer.QueryWriteStatus,
            request_deserializer=bs_pb2.QueryWriteStatusRequest.FromString,
            response_serializer=bs_pb2.QueryWriteStatusResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # As generated code does (grpcio >= 1.62: the server finds these without a lookup; the
    # type stubs do not know the method yet).
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks the outcome of a disk call nobody may wait for any more (the stream broke) as
    seen; a stream that still waits for it gets the failure all the same."""
    if not future.cancelled():
        future.exception()
