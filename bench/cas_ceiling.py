"""The ceiling of a Python gRPC CAS on this machine: a bare grpc.aio ByteStream (and batch)
server that stores nothing. Write takes every message and answers with the size; Read sends
one preallocated buffer over and over, in the same message size as the real service; the
batch calls answer without keeping anything. Whatever our service does on top of this
(hashing, disk, bookkeeping) shows as the gap to it.

Run: `python -m bench.cas_ceiling PORT` (prints "listening on PORT" once it serves).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from google.bytestream import bytestream_pb2 as bs_pb2
from google.bytestream import bytestream_pb2_grpc as bs_grpc
from google.rpc import status_pb2

from worker.server.bytestream import READ_CHUNK_BYTES

_BUFFER = bytes(READ_CHUNK_BYTES)
_OK = status_pb2.Status(code=0)


def _size_of(resource_name: str) -> int:
    """The size part of `.../blobs/HASH/SIZE[/...]`."""
    parts = resource_name.split("/")
    return int(parts[parts.index("blobs") + 2])


class NullByteStream(bs_grpc.ByteStreamServicer):
    async def Write(
        self, request_iterator: AsyncIterator[bs_pb2.WriteRequest], context: Any
    ) -> bs_pb2.WriteResponse:
        received = 0
        async for request in request_iterator:
            received += len(request.data)
            if request.finish_write:
                break
        return bs_pb2.WriteResponse(committed_size=received)

    async def Read(
        self, request: bs_pb2.ReadRequest, context: Any
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        remaining = _size_of(request.resource_name) - request.read_offset
        if request.read_limit:
            remaining = min(remaining, request.read_limit)
        while remaining > 0:
            n = min(remaining, len(_BUFFER))
            yield bs_pb2.ReadResponse(data=_BUFFER if n == len(_BUFFER) else _BUFFER[:n])
            remaining -= n

    async def QueryWriteStatus(
        self, request: bs_pb2.QueryWriteStatusRequest, context: Any
    ) -> bs_pb2.QueryWriteStatusResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling server keeps nothing")
        raise AssertionError


class NullCas(re_grpc.ContentAddressableStorageServicer):
    async def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: Any
    ) -> re_pb2.BatchUpdateBlobsResponse:
        response = re_pb2.BatchUpdateBlobsResponse()
        for item in request.requests:
            response.responses.add(digest=item.digest, status=_OK)
        return response

    async def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: Any
    ) -> re_pb2.BatchReadBlobsResponse:
        response = re_pb2.BatchReadBlobsResponse()
        for digest in request.digests:
            response.responses.add(digest=digest, data=bytes(digest.size_bytes), status=_OK)
        return response

    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: Any
    ) -> re_pb2.FindMissingBlobsResponse:
        return re_pb2.FindMissingBlobsResponse()

    async def GetTree(
        self, request: re_pb2.GetTreeRequest, context: Any
    ) -> AsyncIterator[re_pb2.GetTreeResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the ceiling server keeps nothing")
        yield re_pb2.GetTreeResponse()


async def serve(port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20),
        ]
    )
    bs_grpc.add_ByteStreamServicer_to_server(NullByteStream(), server)
    re_grpc.add_ContentAddressableStorageServicer_to_server(NullCas(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on {bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
