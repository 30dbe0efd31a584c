"""ByteStream over real gRPC on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from tests.concurrently import run_concurrently
from tests.reapi_client import bytestream_read, bytestream_write, write_resource
from tests.serving import RunningService
from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2

DATA = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = Digest.of(DATA)


def stub(service: RunningService) -> bs_grpc.ByteStreamStub:
    return bs_grpc.ByteStreamStub(service.channel)


@pytest.mark.parametrize("instance", ["", "main", "team/a"])
def test_write_then_read_with_and_without_instance_name(
    service: RunningService, instance: str
) -> None:
    response = bytestream_write(service.channel, DATA, resource=write_resource(DIGEST, instance))
    assert response.committed_size == len(DATA)
    assert bytestream_read(service.channel, DIGEST, instance=instance) == DATA


def test_read_streams_in_chunks_and_honours_offset_and_limit(service: RunningService) -> None:
    bytestream_write(service.channel, DATA)
    chunks = list(
        stub(service).Read(bs_pb2.ReadRequest(resource_name=f"blobs/{DIGEST.hash}/{DIGEST.size}"))
    )
    assert len(chunks) >= 3
    assert bytestream_read(service.channel, DIGEST, offset=1000, limit=5000) == DATA[1000:6000]
    assert bytestream_read(service.channel, DIGEST, offset=len(DATA)) == b""
    assert bytestream_read(service.channel, DIGEST, offset=len(DATA) - 3, limit=100) == DATA[-3:]


def test_read_past_the_end_is_out_of_range(service: RunningService) -> None:
    bytestream_write(service.channel, b"short")
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_read(service.channel, Digest.of(b"short"), offset=6)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_read_of_missing_blob_is_not_found(service: RunningService) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_read(service.channel, Digest.of(b"nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["blobs/zz/1", "nonsense", f"blobs/{'a' * 64}/x"])
def test_malformed_read_resource_is_invalid_argument(service: RunningService, name: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub(service).Read(bs_pb2.ReadRequest(resource_name=name)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_write_whose_data_does_not_match_the_digest_is_invalid_argument(
    service: RunningService,
) -> None:
    claimed = Digest.of(b"A" * 100)
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_write(service.channel, b"B" * 100, resource=write_resource(claimed))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = re_grpc.ContentAddressableStorageStub(service.channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[claimed.to_proto()])
    )
    assert len(missing.missing_blob_digests) == 1


def test_write_with_size_mismatch_is_invalid_argument(service: RunningService) -> None:
    real = Digest.of(b"12345")
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_write(service.channel, b"12345", resource=write_resource(Digest(real.hash, 4)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_interrupted_write_resumes_from_query_write_status(service: RunningService) -> None:
    name = write_resource(DIGEST)
    half = len(DATA) // 2

    def first_half() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=DATA[:half])
        # The stream ends without finish_write, as when a client is cut off.

    with pytest.raises(grpc.RpcError):
        stub(service).Write(first_half())
    status = stub(service).QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (half, False)

    rest = bs_pb2.WriteRequest(
        resource_name=name, write_offset=half, data=DATA[half:], finish_write=True
    )
    assert stub(service).Write(iter([rest])).committed_size == len(DATA)
    status = stub(service).QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (len(DATA), True)
    assert bytestream_read(service.channel, DIGEST) == DATA


def test_write_of_a_blob_already_stored_completes_at_once(service: RunningService) -> None:
    bytestream_write(service.channel, DATA)
    response = bytestream_write(service.channel, DATA, chunk=1024)
    assert response.committed_size == len(DATA)


def test_concurrent_writes_of_the_same_blob_are_safe(service: RunningService) -> None:
    data = os.urandom(2 * 1024 * 1024)
    errors = run_concurrently(
        lambda: bytestream_write(service.channel, data, chunk=32 * 1024), threads=6
    )
    assert errors == []
    assert bytestream_read(service.channel, Digest.of(data)) == data
