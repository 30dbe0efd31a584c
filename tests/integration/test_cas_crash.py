"""Crash consistency: the real service, as its own process, is killed with SIGKILL in the
middle of a large ByteStream upload and of a stream of batch uploads. Before and after the
restart no partial or misnamed blob is visible, every acknowledged blob is there whole, the
interrupted upload is gone, and the store's size accounting matches the files on disk."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from tests.reapi_client import bytestream_read, bytestream_write
from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2

MiB = 1 << 20


class ServiceProcess:
    """`sidecar-executor serve` (cache only) as a subprocess, its log in a file."""

    def __init__(self, data_dir: Path, durability: str) -> None:
        config = data_dir.parent / f"config-{data_dir.name}.yaml"
        config.write_text(
            yaml.safe_dump({"execution": {"enabled": False}, "storage": {"durability": durability}})
        )
        self.log = data_dir.parent / f"service-{uuid.uuid4().hex[:8]}.log"
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data_dir),
                "--config",
                str(config),
            ],
            stderr=self._log_file,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while "serving REAPI v2 on " not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        line = self.log.read_text().split("serving REAPI v2 on ", 1)[1]
        self.address = line.split()[0]
        self.channel = grpc.insecure_channel(
            self.address, options=[("grpc.max_send_message_length", 64 * MiB)]
        )

    def startup_accounting(self) -> tuple[int, int, int]:
        """(blobs, executable copies, bytes) from the store's startup log line."""
        found = re.search(
            r"CAS holds (\d+) blobs, (\d+) executable copies, (\d+) bytes", self.log.read_text()
        )
        assert found, self.log.read_text()
        blobs, exes, size = found.groups()
        return int(blobs), int(exes), int(size)

    def kill(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log_file.close()

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self._log_file.close()


def files_on_disk(cas_dir: Path) -> dict[str, int]:
    """Every blob file and executable copy, checked: each must hash to its name."""
    found = {}
    for directory in (cas_dir / "blobs", cas_dir / "executables"):
        for path in directory.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert hashlib.sha256(data).hexdigest() == path.name, f"torn or misnamed: {path}"
                found[str(path.relative_to(cas_dir))] = len(data)
    return found


def batch_update(channel: grpc.Channel, blobs: list[bytes]) -> None:
    response = re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=Digest.of(b).to_proto(), data=b)
                for b in blobs
            ]
        )
    )
    assert all(r.status.code == 0 for r in response.responses)


@pytest.mark.parametrize("durability", ["none", "fsync"])
def test_sigkill_mid_upload_leaves_no_partial_blob_and_loses_nothing_acknowledged(
    tmp_path: Path, durability: str
) -> None:
    data_dir = tmp_path / "data"
    service = ServiceProcess(data_dir, durability)
    acknowledged: list[bytes] = []
    try:
        # A large upload that stops half way: the service holds part of it when it dies.
        large = os.urandom(48 * MiB)
        large_digest = Digest.of(large)
        resource = f"uploads/{uuid.uuid4()}/blobs/{large_digest.hash}/{large_digest.size}"
        half_sent = threading.Event()
        hold = threading.Event()

        def slow_requests() -> Iterator[bs_pb2.WriteRequest]:
            for offset in range(0, len(large), MiB):
                if offset == 24 * MiB:
                    half_sent.set()
                    hold.wait(60)
                    return
                yield bs_pb2.WriteRequest(
                    resource_name=resource, write_offset=offset, data=large[offset : offset + MiB]
                )

        errors: list[BaseException] = []

        def upload_large() -> None:
            try:
                bs_grpc.ByteStreamStub(service.channel).Write(slow_requests())
            except grpc.RpcError as error:
                errors.append(error)

        writer = threading.Thread(target=upload_large)
        writer.start()
        assert half_sent.wait(60)

        # Batches of small blobs, acknowledged one after the other, the last just before the
        # kill, while another thread keeps sending batches that are cut off by it.
        for _ in range(5):
            blobs = [os.urandom(1024) for _ in range(200)]
            batch_update(service.channel, blobs)
            acknowledged.extend(blobs)
        stop_sending = threading.Event()

        def keep_sending() -> None:
            while not stop_sending.is_set():
                try:
                    batch_update(service.channel, [os.urandom(1024) for _ in range(200)])
                except (grpc.RpcError, ValueError):
                    return

        sender = threading.Thread(target=keep_sending)
        sender.start()
        time.sleep(0.2)
        service.kill()
        stop_sending.set()
        hold.set()
        writer.join(30)
        sender.join(30)
        assert errors, "the large upload cannot have succeeded"

        # What a crash leaves: only whole blobs under their names (the rest is in tmp/ and in
        # the journal, which the next start sorts out).
        files_on_disk(data_dir / "cas")

        service = ServiceProcess(data_dir, durability)
        on_disk = files_on_disk(data_dir / "cas")
        count, exes, size = service.startup_accounting()
        assert (count, exes, size) == (len(on_disk), 0, sum(on_disk.values()))
        assert list((data_dir / "cas" / "tmp").iterdir()) == []
        assert list((data_dir / "cas" / "journal").iterdir()) == []

        digests = [Digest.of(b) for b in acknowledged]
        missing = re_grpc.ContentAddressableStorageStub(service.channel).FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d in digests])
        )
        assert list(missing.missing_blob_digests) == []
        assert all(
            bytestream_read(service.channel, d) == b
            for d, b in zip(digests, acknowledged, strict=True)
        )
        assert f"blobs/{large_digest.hash[:2]}/{large_digest.hash}" not in on_disk
        status = bs_grpc.ByteStreamStub(service.channel).QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=resource)
        )
        assert (status.committed_size, status.complete) == (0, False)
        # And the upload can simply be done again.
        response = bytestream_write(service.channel, large, chunk=MiB, resource=resource)
        assert response.committed_size == len(large)
        assert bytestream_read(service.channel, large_digest) == large
    finally:
        service.stop()
