"""Small client-side helpers the tests use to talk REAPI to the service."""

from __future__ import annotations

import uuid

import grpc

from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2


def upload_batch(channel: grpc.Channel, *blobs: bytes) -> list[Digest]:
    stub = re_grpc.ContentAddressableStorageStub(channel)
    digests = [Digest.of(blob) for blob in blobs]
    response = stub.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=blob)
                for d, blob in zip(digests, blobs, strict=True)
            ]
        )
    )
    assert all(r.status.code == 0 for r in response.responses), response
    return digests


def upload_message(channel: grpc.Channel, message: object) -> Digest:
    data = message.SerializeToString()  # type: ignore[attr-defined]
    return upload_batch(channel, data)[0]


def write_resource(digest: Digest, instance: str = "") -> str:
    prefix = f"{instance}/" if instance else ""
    return f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size}"


def bytestream_write(
    channel: grpc.Channel, data: bytes, chunk: int = 64 * 1024, resource: str | None = None
) -> bs_pb2.WriteResponse:
    digest = Digest.of(data)
    name = resource or write_resource(digest)

    def requests() -> object:
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

    return bs_grpc.ByteStreamStub(channel).Write(requests())  # type: ignore[arg-type]


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
