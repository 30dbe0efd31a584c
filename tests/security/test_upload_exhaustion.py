"""Hostile or careless clients that abandon uploads, against the real service over gRPC.

ByteStream says a `Write()` "is resumable. If there is an error or the connection is broken
during the `Write()`, the client should check the status of the `Write()` by calling
`QueryWriteStatus()` and continue writing from the returned `committed_size`", so the service
keeps what an interrupted Write sent. Nothing stops a client from never coming back: each kept
upload must therefore cost no file descriptor, count against `storage.max_bytes`, and be
bounded in number by `storage.max_partial_uploads`, while every other RPC keeps working.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.reapi_client import bytestream_read, bytestream_write, upload_batch, write_resource
from tests.serving import running_service
from worker.config import load_settings
from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2

CHUNK = 8 * 1024
REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def abandon_upload(channel: grpc.Channel, data: bytes) -> tuple[str, grpc.StatusCode]:
    """Starts a Write of `data`, sends its first chunk and ends the stream without
    finish_write, as a client that is cut off and never returns. Returns the resource name
    and the status the service answered with."""
    name = write_resource(Digest.of(data))

    def first_chunk_only() -> Iterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=data[:CHUNK])

    try:
        bs_grpc.ByteStreamStub(channel).Write(first_chunk_only(), timeout=10)
    except grpc.RpcError as error:
        return name, error.code()
    return name, grpc.StatusCode.OK


def open_fds(pid: int | str = "self") -> list[str]:
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return held


def assert_every_stored_blob_hashes_to_its_name(cas_dir: Path) -> int:
    checked = 0
    for directory in (cas_dir / "blobs", cas_dir / "executables"):
        for path in directory.rglob("*"):
            if path.is_file():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
                checked += 1
    return checked


def find_missing(channel: grpc.Channel, digests: list[Digest]) -> list[Digest]:
    response = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d in digests])
    )
    return [Digest.from_proto(d) for d in response.missing_blob_digests]


def test_abandoned_uploads_hold_no_descriptor_are_bounded_and_expire(tmp_path: Path) -> None:
    limit = 150
    settings = load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0"},
        execution={"enabled": False},
        storage={"max_partial_uploads": limit, "upload_ttl_s": 600},
    )
    cas_dir = settings.data_dir / "cas"
    with running_service(settings) as running:
        clock = Clock()
        running.service.storage.uploads.clock = clock
        channel = running.channel
        small = [os.urandom(100) for _ in range(20)]
        stored = upload_batch(channel, *small)
        large = os.urandom(3 * 1024 * 1024)
        bytestream_write(channel, large)
        stored.append(Digest.of(large))

        fds_before = len(open_fds())
        datas = [os.urandom(4 * CHUNK) for _ in range(limit)]
        answers = [abandon_upload(channel, data) for data in datas]
        fds_after = len(open_fds())

        # Every one was kept for resuming, and none holds a descriptor.
        assert {code for _, code in answers} == {grpc.StatusCode.INVALID_ARGUMENT}
        running.service.storage.blobs.flush()  # the batch's small blobs are files by now
        assert len(list((cas_dir / "tmp").iterdir())) == limit
        assert [p for p in open_fds() if p.startswith(f"{cas_dir}/")] == []
        assert fds_after - fds_before < limit // 10, (fds_before, fds_after)

        # One more new upload is refused; nothing else is.
        _, code = abandon_upload(channel, os.urandom(4 * CHUNK))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as caught:
            bytestream_write(channel, os.urandom(2 * CHUNK), chunk=CHUNK)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # A blob sent whole in one message needs no partial upload, so it is still taken.
        whole = os.urandom(2 * CHUNK)
        bytestream_write(channel, whole, chunk=2 * CHUNK)
        stored.append(Digest.of(whole))
        assert find_missing(channel, stored) == []
        assert bytestream_read(channel, Digest.of(large)) == large
        (batched,) = upload_batch(channel, b"batch uploads still work")
        re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())

        # An upload already under way resumes where QueryWriteStatus says.
        name, data = answers[7][0], datas[7]
        stub = bs_grpc.ByteStreamStub(channel)
        status = stub.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name))
        assert status.committed_size == CHUNK
        rest = bs_pb2.WriteRequest(
            resource_name=name, write_offset=CHUNK, data=data[CHUNK:], finish_write=True
        )
        assert stub.Write(iter([rest])).committed_size == len(data)

        # Once they are stale, the abandoned uploads make way and their files are deleted.
        clock.now += 601
        fresh = os.urandom(2 * CHUNK)
        assert bytestream_write(channel, fresh).committed_size == len(fresh)
        running.service.storage.blobs.flush()
        assert list((cas_dir / "tmp").iterdir()) == []
        assert len(running.service.storage.uploads) == 0
        blobs = running.service.storage.blobs
        assert blobs.reserved_bytes == 0
        assert find_missing(channel, [*stored, batched, Digest.of(data), Digest.of(fresh)]) == []
        assert len(open_fds()) - fds_before < limit // 10
    assert assert_every_stored_blob_hashes_to_its_name(cas_dir) == len(stored) + 3


def test_partial_uploads_count_toward_max_bytes(tmp_path: Path) -> None:
    """`storage.max_bytes` bounds what the CAS holds on disk, partial uploads included: they
    push out least recently used blobs, and what cannot fit at all is RESOURCE_EXHAUSTED."""
    mib = 1024 * 1024
    settings = load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0"},
        execution={"enabled": False},
        storage={"max_bytes": 4 * mib, "max_batch_total_size_bytes": mib},
    )
    cas_dir = settings.data_dir / "cas"
    with running_service(settings) as running:
        channel = running.channel
        old = [os.urandom(mib - 1000) for _ in range(3)]
        for data in old:
            bytestream_write(channel, data)
        # Two abandoned 1.5 MiB uploads whose first 1.2 MiB arrived: 2.4 MiB held.
        held = [os.urandom(mib + mib // 2) for _ in range(2)]
        for data in held:
            name = write_resource(Digest.of(data))
            request = bs_pb2.WriteRequest(resource_name=name, data=data[: mib + mib // 5])
            with pytest.raises(grpc.RpcError):
                bs_grpc.ByteStreamStub(channel).Write(iter([request]))
        on_disk = sum(p.stat().st_size for p in cas_dir.rglob("*") if p.is_file())
        assert on_disk <= 4 * mib
        assert len(find_missing(channel, [Digest.of(d) for d in old])) >= 2  # LRU evicted
        # 2.4 MiB held + 2 MiB more cannot fit even with every blob evicted.
        with pytest.raises(grpc.RpcError) as caught:
            bytestream_write(channel, os.urandom(2 * mib), chunk=256 * 1024)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = os.urandom(1000)
        assert bytestream_write(channel, small).committed_size == len(small)
        assert bytestream_read(channel, Digest.of(small)) == small
        on_disk = sum(p.stat().st_size for p in cas_dir.rglob("*") if p.is_file())
        assert on_disk <= 4 * mib
    assert_every_stored_blob_hashes_to_its_name(cas_dir)


def serve_with_few_descriptors(
    data_dir: Path, log: Path, max_fds: int, max_uploads: int
) -> subprocess.Popen[bytes]:
    launcher = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({max_fds}, {max_fds}))\n"
        "from worker.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {
        **os.environ,
        "SIDECAR_EXECUTOR_EXECUTION__ENABLED": "false",
        "SIDECAR_EXECUTOR_STORAGE__MAX_PARTIAL_UPLOADS": str(max_uploads),
    }
    command = [sys.executable, "-c", launcher, "serve", "--listen", "127.0.0.1:0"]
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [*command, "--data-dir", str(data_dir)], stderr=stderr, env=env, cwd=REPO
        )


def wait_for_port(process: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        for line in log.read_text().splitlines():
            if "serving REAPI v2 on 127.0.0.1:" in line:
                return int(line.rsplit(":", 1)[1].split()[0])
        time.sleep(0.05)
    raise AssertionError(f"the service did not start:\n{log.read_text()}")


def test_a_service_with_few_descriptors_survives_a_flood_of_abandoned_uploads(
    tmp_path: Path,
) -> None:
    """The service runs with RLIMIT_NOFILE 96. When each abandoned upload kept its file open,
    the flood exhausted the descriptors after about 70 uploads and every RPC after that
    (even FindMissingBlobs on a new connection) failed; now the flood only meets the limit
    on uploads, RESOURCE_EXHAUSTED, and the service's descriptor count stays flat."""
    data_dir, log = tmp_path / "data", tmp_path / "service.log"
    process = serve_with_few_descriptors(data_dir, log, max_fds=96, max_uploads=120)
    try:
        port = wait_for_port(process, log)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            kept = upload_batch(channel, *(os.urandom(500) for _ in range(10)))
            fds_before = len(open_fds(process.pid))
            answers = [abandon_upload(channel, os.urandom(2 * CHUNK))[1] for _ in range(140)]
            assert (
                answers
                == [grpc.StatusCode.INVALID_ARGUMENT] * 120
                + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 20
            ), log.read_text()[-3000:]
            assert len(open_fds(process.pid)) - fds_before < 10
            assert find_missing(channel, kept) == []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh_channel:  # a new connection
            assert find_missing(fresh_channel, kept) == []
            assert bytestream_read(fresh_channel, kept[0]) != b""
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    assert "Too many open files" not in log.read_text()
    assert assert_every_stored_blob_hashes_to_its_name(data_dir / "cas") == len(kept)


def test_a_stream_of_tiny_messages_is_bounded_by_its_memory_not_its_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile client sends a Write as a flood of tiny messages while the disk is slow. Each
    message is a Python object of its own in the service, so what a stream may gather counts
    a per-message overhead (MESSAGE_OVERHEAD_BYTES): it is handed to the disk after far fewer
    payload bytes than FLUSH_BYTES, instead of piling up ~25x its payload in memory."""
    from worker.server.bytestream import FLUSH_BYTES, MESSAGE_OVERHEAD_BYTES

    settings = load_settings(
        data_dir=tmp_path / "data", server={"listen": "127.0.0.1:0"}, execution={"enabled": False}
    )
    piece = 16
    count = 2 * FLUSH_BYTES // (piece + MESSAGE_OVERHEAD_BYTES) + 1000  # > two flushes' worth
    data = os.urandom(piece * count)
    with running_service(settings) as running:
        appended: list[int] = []
        append = running.service.storage.uploads.append

        def slow_append(upload: object, offset: int, chunk: bytes) -> None:
            appended.append(len(chunk))
            time.sleep(0.05)
            append(upload, offset, chunk)  # type: ignore[arg-type]

        monkeypatch.setattr(running.service.storage.uploads, "append", slow_append)
        response = bytestream_write(running.channel, data, chunk=piece)
        assert response.committed_size == len(data)
        assert bytestream_read(running.channel, Digest.of(data)) == data
    # The payload (~440 KB) never reaches FLUSH_BYTES; counted with its overhead it does,
    # more than once, so the stream hands data over in parts, none near FLUSH_BYTES of payload.
    assert len(appended) >= 3, appended
    assert max(appended) < FLUSH_BYTES // 2, appended
