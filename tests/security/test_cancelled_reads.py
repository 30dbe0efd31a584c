"""A hostile client that cancels ByteStream Reads while the service opens the blob.

A Read first opens the blob in a CAS worker thread (and, for part of a blob whose file
changed, hashes the whole file first, which takes a while for a large one). A client that
cancels at that moment must not leave the file open: before, the thread's result was dropped
with its descriptor, and 300 cancelled Reads of a 256 MiB blob left 42 descriptors open
(found by an attack session), enough to exhaust the process's limit over time and to keep
evicted blobs' space in use.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.reapi_client import bytestream_write
from tests.serving import RunningService
from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2
from worker.server import bytestream


def descriptors_on(path: Path) -> int:
    """How many of this process's descriptors (the service runs in it) are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.path.realpath(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass  # closed meanwhile
    return count


def test_reads_cancelled_while_the_blob_is_opened_leave_no_descriptor_open(
    service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 << 20)
    digest = Digest.of(data)
    bytestream_write(service.channel, data)
    path = Path(service.service.storage.blobs.hash_path(digest.hash)).resolve()
    opened = threading.Semaphore(0)
    open_reader = bytestream._open_reader

    def slow_open(*args: object) -> object:
        result = open_reader(*args)  # type: ignore[arg-type]
        opened.release()
        time.sleep(0.3)  # the client cancels meanwhile
        return result

    monkeypatch.setattr(bytestream, "_open_reader", slow_open)
    stub = bs_grpc.ByteStreamStub(service.channel)
    for _ in range(5):
        call = stub.Read(bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}"))
        assert opened.acquire(timeout=10)
        call.cancel()  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError):
            next(iter(call))
    deadline = time.monotonic() + 10
    while descriptors_on(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert descriptors_on(path) == 0
    monkeypatch.undo()
    assert (
        b"".join(
            r.data
            for r in stub.Read(
                bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}")
            )
        )
        == data
    )
