from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.concurrently import run_concurrently
from worker.cas.disk_store import DiskBlobStore
from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import InvalidArgument, NotFound, ResourceExhausted

MiB = 1 << 20


def blob(n: int, size: int = 1000) -> bytes:
    return bytes([n % 256]) * size


def test_put_then_read_round_trips_and_file_is_read_only(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    data = b"hello"
    digest = Digest.of(data)
    store.put(digest, data)
    assert store.read(digest) == data
    assert stat.S_IMODE(store.blob_path(digest).stat().st_mode) == 0o444


def test_empty_blob_is_always_present(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    assert store.contains(EMPTY_DIGEST)
    assert store.find_missing([EMPTY_DIGEST]) == []
    assert store.read(EMPTY_DIGEST) == b""


def test_put_with_wrong_digest_is_rejected_and_nothing_is_stored(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    wrong = Digest.of(b"other")
    with pytest.raises(InvalidArgument, match="hashes to"):
        store.put(wrong, b"hello")
    assert not store.contains(wrong)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_size_mismatch_is_a_different_blob(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    digest = Digest.of(b"hello")
    store.put(digest, b"hello")
    assert not store.contains(Digest(digest.hash, 99))
    with pytest.raises(NotFound):
        store.read(Digest(digest.hash, 99))


def test_least_recently_used_blob_is_evicted_first(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=3000)
    first, second, third, fourth = (Digest.of(blob(i)) for i in range(4))
    for i, digest in enumerate((first, second, third)):
        store.put(digest, blob(i))
    assert store.contains(first)  # first is now the most recently used
    store.put(fourth, blob(3))
    assert store.find_missing([first, second, third, fourth]) == [second]
    assert not store.blob_path(second).exists()
    assert store.total_bytes == 3000


def test_blob_larger_than_the_store_is_resource_exhausted(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    data = blob(1, MiB + 1)
    with pytest.raises(ResourceExhausted):
        store.put(Digest.of(data), data)


def test_blobs_survive_a_restart(tmp_path: Path) -> None:
    data = b"persistent"
    DiskBlobStore(tmp_path, max_bytes=MiB).put(Digest.of(data), data)
    reopened = DiskBlobStore(tmp_path, max_bytes=MiB)
    assert reopened.read(Digest.of(data)) == data
    assert reopened.total_bytes == len(data)


def test_leftover_temp_files_from_a_crash_are_cleared_and_never_visible(tmp_path: Path) -> None:
    DiskBlobStore(tmp_path, max_bytes=MiB)
    (tmp_path / "tmp" / "blob-partial").write_bytes(b"half a blo")
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.total_bytes == 0


def test_concurrent_writers_of_the_same_blob_leave_one_intact_copy(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=64 * MiB)
    data = os.urandom(4 * MiB)
    digest = Digest.of(data)
    errors = run_concurrently(lambda: store.put(digest, data), threads=8)
    assert errors == []
    assert store.read(digest) == data
    assert store.total_bytes == len(data)


def test_executable_copy_is_0555_and_separate_from_the_0444_blob(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    digest = Digest.of(b"#!/bin/sh\n")
    store.put(digest, b"#!/bin/sh\n")
    exe = store.require_executable(digest)
    assert stat.S_IMODE(exe.stat().st_mode) == 0o555
    assert stat.S_IMODE(store.blob_path(digest).stat().st_mode) == 0o444
    assert exe.read_bytes() == b"#!/bin/sh\n"


def test_ingest_file_copies_so_later_changes_to_the_source_do_not_reach_the_cas(
    tmp_path: Path,
) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=MiB)
    source = tmp_path / "output.txt"
    source.write_bytes(b"result")
    digest = store.ingest_file(source)
    source.write_bytes(b"tampered")
    assert store.read(digest) == b"result"
