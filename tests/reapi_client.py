"""Small client-side helpers the tests use to talk REAPI to the service."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
from google.protobuf.message import Message

from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2

BATCH_BYTES = 2 * 1024 * 1024


def upload_batch(channel: grpc.Channel, *blobs: bytes) -> list[Digest]:
    """Uploads blobs with BatchUpdateBlobs, in as many batches of at most BATCH_BYTES as needed."""
    stub = re_grpc.ContentAddressableStorageStub(channel)
    digests = [Digest.of(blob) for blob in blobs]
    batch: list[re_pb2.BatchUpdateBlobsRequest.Request] = []
    size = 0
    for digest, blob in zip(digests, blobs, strict=True):
        if batch and size + len(blob) > BATCH_BYTES:
            _send(stub, batch)
            batch, size = [], 0
        batch.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=digest.to_proto(), data=blob))
        size += len(blob)
    if batch:
        _send(stub, batch)
    return digests


def _send(
    stub: re_grpc.ContentAddressableStorageStub,
    batch: list[re_pb2.BatchUpdateBlobsRequest.Request],
) -> None:
    response = stub.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=batch))
    assert all(r.status.code == 0 for r in response.responses), response


def upload_message(channel: grpc.Channel, message: Message) -> Digest:
    data = message.SerializeToString()
    return upload_batch(channel, data)[0]


def write_resource(digest: Digest, instance: str = "") -> str:
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size}"


def bytestream_write(
    channel: grpc.Channel, data: bytes, chunk: int = 64 * 1024, resource: str | None = None
) -> bs_pb2.WriteResponse:
    digest = Digest.of(data)
    name = resource or write_resource(digest)

    def requests() -> Iterator[bs_pb2.WriteRequest]:
        offset = 0
        while True:
            piece = data[offset : offset + chunk]
            last = offset + len(piece) >= len(data)
            yield bs_pb2.WriteRequest(
                resource_name=name if offset == 0 else "",
                write_offset=offset,
                data=piece,
                finish_write=last,
            )
            offset += len(piece)
            if last:
                return

    return bs_grpc.ByteStreamStub(channel).Write(requests())


def bytestream_read(
    channel: grpc.Channel, digest: Digest, offset: int = 0, limit: int = 0, instance: str = ""
) -> bytes:
    prefix = f"{instance}/" if instance else ""
    request = bs_pb2.ReadRequest(
        resource_name=f"{prefix}blobs/{digest.hash}/{digest.size}",
        read_offset=offset,
        read_limit=limit,
    )
    return b"".join(r.data for r in bs_grpc.ByteStreamStub(channel).Read(request))
