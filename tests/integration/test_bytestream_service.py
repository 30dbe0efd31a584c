"""ByteStream over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.concurrently import run_concurrently
from tests.reapi_client import bytestream_read, bytestream_write, upload_batch, write_resource
from tests.serving import RunningService
from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2
from worker.server.bytestream import BUFFER_BYTES, READ_CHUNK_BYTES, encode_read_response

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
    assert len(chunks) == -(-len(DATA) // READ_CHUNK_BYTES) >= 2
    assert all(len(c.data) <= READ_CHUNK_BYTES for c in chunks)
    assert bytestream_read(service.channel, DIGEST, offset=1000, limit=5000) == DATA[1000:6000]
    assert bytestream_read(service.channel, DIGEST, offset=len(DATA)) == b""
    assert bytestream_read(service.channel, DIGEST, offset=len(DATA) - 3, limit=100) == DATA[-3:]


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, READ_CHUNK_BYTES])
def test_read_responses_encoded_directly_are_what_protobuf_encodes(size: int) -> None:
    """Read yields its responses already encoded; they must be byte for byte what protobuf
    makes of ReadResponse(data=...), at every length where the length prefix grows."""
    data = os.urandom(size)
    encoded = encode_read_response(data)
    assert encoded == bs_pb2.ReadResponse(data=data).SerializeToString()
    assert bs_pb2.ReadResponse.FromString(encoded).data == data


def test_read_past_the_end_is_out_of_range(service: RunningService) -> None:
    bytestream_write(service.channel, b"short")
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_read(service.channel, Digest.of(b"short"), offset=6)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE


@pytest.mark.parametrize(("offset", "limit"), [(0, 0), (4, 0), (4, 10), (2, 0)])
def test_read_of_missing_blob_is_not_found(
    service: RunningService, offset: int, limit: int
) -> None:
    """Even at its end (read_offset == size), where there is nothing to read: a missing blob
    is NOT_FOUND, not an empty success."""
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_read(service.channel, Digest.of(b"nope"), offset=offset, limit=limit)
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


HOSTILE_NAMES = [
    f"uploads/u/blobs/{'a' * 64}/²",  # str.isdigit() is true, int() fails
    f"uploads/u/blobs/{'a' * 64}/{'9' * 5000}",  # int() refuses more than 4300 digits
    f"uploads/u/blobs/{'a' * 64}/9223372036854775808",  # above int64
    f"uploads/u/blobs/{'a' * 64}/-1",
    f"uploads/u/blobs/{'A' * 64}/1",
    f"uploads/../blobs/{'a' * 64}/1",
    f"uploads//blobs/{'a' * 64}/1",
    f"../uploads/u/blobs/{'a' * 64}/1",
    f"uploads/{'u' * 10000}/blobs/{'a' * 64}/1",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_write_resource_names_are_invalid_argument_never_internal(
    service: RunningService, name: str
) -> None:
    """REAPI: the upload resource is `{instance_name}/uploads/{uuid}/blobs/{hash}/{size}`,
    with `hash` "always a lowercase hex string" and `size_bytes` an int64. Anything else is
    the client's mistake: INVALID_ARGUMENT from Write and QueryWriteStatus alike."""
    request = bs_pb2.WriteRequest(resource_name=name, data=b"x", finish_write=True)
    with pytest.raises(grpc.RpcError) as caught:
        stub(service).Write(iter([request]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub(service).QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    read_name = name.replace("uploads/u/", "").replace("uploads/../", "../")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub(service).Read(bs_pb2.ReadRequest(resource_name=read_name)))
    assert caught.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,  # the upload-id cases are well-formed read names
    ), caught.value.details()


def test_first_write_offset_that_does_not_continue_is_invalid_argument(
    service: RunningService,
) -> None:
    """ByteStream: the first `write_offset` "must be equal to the `committed_size` that a
    call to `QueryWriteStatus()` would return ... An incorrect value will cause an error."""
    name = write_resource(DIGEST)
    request = bs_pb2.WriteRequest(resource_name=name, write_offset=5, data=DATA[5:10])
    with pytest.raises(grpc.RpcError) as caught:
        stub(service).Write(iter([request]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not continue" in (caught.value.details() or "")


def start_stale_stream(
    service: RunningService, name: str, half: int, release: threading.Event
) -> grpc.Future[bs_pb2.WriteResponse]:
    """A Write that sends the first half, then stalls (a client that gave up on it) until
    `release`, then sends the rest; returns once the server holds the first half."""

    def requests() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=DATA[:half])
        release.wait(20)
        yield bs_pb2.WriteRequest(write_offset=half, data=DATA[half:], finish_write=True)

    future = stub(service).Write.future(requests(), timeout=30)
    query = bs_pb2.QueryWriteStatusRequest(resource_name=name)
    deadline = time.monotonic() + 10
    while stub(service).QueryWriteStatus(query).committed_size < half:
        assert time.monotonic() < deadline, "the first half never arrived"
        time.sleep(0.01)
    return future


def test_a_stream_whose_upload_another_stream_finished_gets_the_full_size(
    service: RunningService,
) -> None:
    """REAPI: "if another client has already completed the upload (which may occur in the
    middle of a single upload ...), the request will terminate immediately with a response
    whose `committed_size` is the full size of the uploaded file". Here the other stream is
    the client's own retry, with the same upload id, racing its stalled first attempt."""
    name, half, release = write_resource(DIGEST), len(DATA) // 2, threading.Event()
    stale = start_stale_stream(service, name, half, release)
    retry = bs_pb2.WriteRequest(
        resource_name=name, write_offset=half, data=DATA[half:], finish_write=True
    )
    assert stub(service).Write(iter([retry])).committed_size == len(DATA)
    release.set()
    assert stale.result(timeout=20).committed_size == len(DATA)
    assert bytestream_read(service.channel, DIGEST) == DATA


def test_a_stream_whose_upload_another_stream_dropped_is_invalid_argument(
    service: RunningService,
) -> None:
    """The retry sends more bytes than the digest's size, which drops the upload; the stalled
    first stream then continues at the offset it had. It used to append to the file the
    retry had closed (INTERNAL); now it is told the upload is gone."""
    name, half, release = write_resource(DIGEST), len(DATA) // 2, threading.Event()
    stale = start_stale_stream(service, name, half, release)
    too_long = bs_pb2.WriteRequest(
        resource_name=name, write_offset=half, data=DATA[half:] + b"!", finish_write=True
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub(service).Write(iter([too_long]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    release.set()
    with pytest.raises(grpc.RpcError) as caught:
        stale.result(timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    status = stub(service).QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (0, False)
    assert bytestream_write(service.channel, DATA).committed_size == len(DATA)


def test_resuming_a_blob_that_is_already_stored_gets_the_full_size(
    service: RunningService,
) -> None:
    bytestream_write(service.channel, DATA)
    resumed = bs_pb2.WriteRequest(
        resource_name=write_resource(DIGEST), write_offset=1000, data=DATA[1000:2000]
    )
    assert stub(service).Write(iter([resumed])).committed_size == len(DATA)


def test_an_interrupted_upload_keeps_no_file_open(service: RunningService) -> None:
    name = write_resource(DIGEST)

    def first_part() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=DATA[:1000])

    with pytest.raises(grpc.RpcError):
        stub(service).Write(first_part())
    tmp = service.service.settings.data_dir / "cas" / "tmp"
    assert len(list(tmp.iterdir())) == 1  # the partial data is kept...
    assert files_held_open_under(tmp) == []  # ...but not open


def files_held_open_under(directory: Path) -> list[str]:
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile, by another thread or by listdir
            continue
    return [path for path in held if path.startswith(f"{directory}/")]


def test_disk_work_of_writes_and_reads_runs_off_the_event_loop(
    service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One event loop serves every RPC: a chunk append, an open or a lookup that waits on the
    disk (or on the store's lock while it evicts) there stalls all of them."""
    on_loop: list[str] = []

    def watched(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:  # no loop in this thread: a worker thread
                pass
            return method(*args)

        return wrapper

    storage = service.service.storage
    watch: list[tuple[object, str]] = [(storage.uploads, m) for m in ("begin", "append", "finish")]
    watch += [
        (storage.blobs, m)
        for m in ("contains", "open_fd", "pending_data", "put_many", "find_missing", "read_many")
    ]
    for obj, method in watch:
        monkeypatch.setattr(obj, method, watched(method, getattr(obj, method)))
    name = write_resource(DIGEST)
    bytestream_write(service.channel, DATA, chunk=256 * 1024, resource=name)
    stub(service).QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert bytestream_read(service.channel, DIGEST) == DATA
    small = b"a small blob, written and read whole"
    bytestream_write(service.channel, small)
    assert bytestream_read(service.channel, Digest.of(small)) == small
    (batched,) = upload_batch(service.channel, b"a batched blob")
    cas = re_grpc.ContentAddressableStorageStub(service.channel)
    cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[batched.to_proto()]))
    cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[batched.to_proto()]))
    assert on_loop == []


def test_a_write_keeps_receiving_while_the_disk_is_slow_and_holds_a_bounded_amount(
    service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one append is in a worker thread the stream goes on taking messages and hands
    them over together (a slow disk does not stop the client at every megabyte), but never
    more than BUFFER_BYTES at a time (what a stream may hold in memory)."""
    appended: list[int] = []
    append = service.service.storage.uploads.append

    def slow_append(upload: Any, offset: int, data: bytes) -> None:
        appended.append(len(data))
        time.sleep(0.05)
        append(upload, offset, data)

    monkeypatch.setattr(service.service.storage.uploads, "append", slow_append)
    data = os.urandom(24 * 1024 * 1024)
    response = bytestream_write(service.channel, data, chunk=1024 * 1024)
    assert response.committed_size == len(data)
    assert bytestream_read(service.channel, Digest.of(data)) == data
    assert sum(appended) == len(data)
    assert len(appended) < 24, f"one append per message: {appended}"
    assert max(appended) <= BUFFER_BYTES + 1024 * 1024, appended
