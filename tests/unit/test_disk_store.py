from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from tests.concurrently import run_concurrently
from worker.cas import disk_store
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


def test_put_many_names_what_is_wrong_with_a_malformed_declared_digest(tmp_path: Path) -> None:
    """put_many takes digests as declared (unchecked): one no data can hash to is refused with
    what Digest() says of it, a mismatch with what the data hashes to, and the rest stored."""
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    real = Digest.of(b"data")
    results = store.put_many(
        [
            (real.hash.upper(), real.size, b"data"),
            (real.hash, -1, b"data"),
            (real.hash, real.size + 1, b"data"),
            (real.hash, real.size, b"data"),
        ]
    )
    messages = [str(r) if r is not None else None for r in results]
    assert "64 lowercase hex" in str(messages[0]) and "negative" in str(messages[1])
    assert "hashes to" in str(messages[2]) and messages[3] is None
    assert all(isinstance(r, InvalidArgument) for r in results[:3])
    assert store.read(real) == b"data"
    store.close()


def test_a_blob_sent_twice_in_one_batch_fares_the_same_both_times(tmp_path: Path) -> None:
    """put_many stores each distinct blob once; a repeat gets the first one's outcome, also
    when that is a failure (here: no room for both blobs of the batch)."""
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    a, b = os.urandom(600_000), os.urandom(600_000)

    def item(data: bytes) -> tuple[str, int, bytes]:
        return Digest.of(data).hash, len(data), data

    results = store.put_many([item(a), item(b), item(a)])
    assert [type(r) for r in results] == [ResourceExhausted] * 3
    assert not store.contains(Digest.of(a)) and not store.contains(Digest.of(b))
    assert store.put_many([item(a), item(a)]) == [None, None]
    assert store.read(Digest.of(a)) == a
    store.close()


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
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    store.put(Digest.of(data), data)
    store.close()  # A store left open would go on filing its journal beside the new one.
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


def disk_bytes(root: Path) -> int:
    """What the store really holds on disk: blobs, executable copies and temporary files."""
    return sum(
        path.stat().st_size
        for part in ("blobs", "executables", "tmp")
        for path in (root / part).rglob("*")
        if path.is_file()
    )


def assert_index_matches_disk(store: DiskBlobStore, digests: list[Digest]) -> None:
    for digest in digests:
        if store.contains(digest):
            path = store.blob_path(digest)
            assert path.exists(), f"index says {digest} is present but its file is gone"
            assert Digest.of(path.read_bytes()) == digest


def test_eviction_never_unlinks_a_blob_that_a_concurrent_put_just_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race reviewers found: eviction took a blob out of the index, released the lock and
    only then unlinked its file. A put of the same blob in between (it is missing, so it is
    written again and indexed) lost its file to that late unlink, and FindMissingBlobs said
    "present" until a restart. The hook runs the concurrent put exactly in that window."""
    store = DiskBlobStore(tmp_path, max_bytes=2000)
    first, second, third = (Digest.of(blob(i)) for i in range(3))
    store.put(first, blob(0))
    store.put(second, blob(1))
    racer: list[threading.Thread] = []
    real_unlink = os.unlink

    def unlink_with_a_racing_put(path: str | os.PathLike[str], *args: object, **kw: object) -> None:
        if not racer and os.fspath(path) == str(store.blob_path(first)):
            thread = threading.Thread(target=store.put, args=(first, blob(0)))
            racer.append(thread)
            thread.start()
            thread.join(timeout=0.3)  # It completes here unless the store's lock holds it back.
        real_unlink(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink_with_a_racing_put)
    store.put(third, blob(2))  # evicts `first`, the least recently used
    racer[0].join()
    monkeypatch.undo()
    assert_index_matches_disk(store, [first, second, third])
    assert store.total_bytes == sum(
        store.blob_path(d).stat().st_size for d in (first, second, third) if store.contains(d)
    )


def test_index_and_disk_stay_in_step_under_concurrent_puts_and_evictions(tmp_path: Path) -> None:
    """Many threads putting blobs in a store too small for all of them: afterwards every blob
    the index lists is on disk and intact, and the count matches the disk. (A check of the
    invariant; the test above is the one that pins the old race down deterministically.)"""
    store = DiskBlobStore(tmp_path, max_bytes=5000)  # room for 10 of the 12 blobs
    datas = [blob(i, 500) for i in range(12)]
    digests = [Digest.of(d) for d in datas]

    def churn() -> None:
        for round_ in range(150):
            i = (round_ * 7 + threading.get_ident()) % len(datas)
            store.put(digests[i], datas[i])
            store.contains(digests[(i + 3) % len(datas)])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, to hit any gap between index and disk
    try:
        assert run_concurrently(churn, threads=6) == []
    finally:
        sys.setswitchinterval(interval)
    assert_index_matches_disk(store, digests)
    stored = [d for d in digests if store.contains(d)]
    assert store.total_bytes == sum(d.size for d in stored) <= store.max_bytes
    assert disk_bytes(tmp_path) == store.total_bytes


def test_executable_copies_count_toward_max_bytes_and_go_with_their_blob(tmp_path: Path) -> None:
    """A 0555 copy takes as much disk as its blob, so `storage.max_bytes` must count it."""
    store = DiskBlobStore(tmp_path, max_bytes=2500)
    first, second = Digest.of(blob(1)), Digest.of(blob(2))
    store.put(first, blob(1))
    store.require_executable(first)
    assert store.total_bytes == 2000
    store.put(second, blob(2))  # 3000 bytes would not fit: `first` and its copy go
    assert store.find_missing([first, second]) == [first]
    assert not (tmp_path / "executables" / first.hash).exists()
    store.flush()  # small blobs become files in the background (worker.cas.journal)
    assert store.total_bytes == 1000 == disk_bytes(tmp_path)


def test_executable_copies_are_counted_again_after_a_restart(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    digest = Digest.of(blob(1))
    store.put(digest, blob(1))
    store.require_executable(digest)
    (tmp_path / "executables" / ("f" * 64)).write_bytes(b"orphan")  # its blob is gone
    store.close()
    reopened = DiskBlobStore(tmp_path, max_bytes=MiB)
    assert reopened.total_bytes == 2000 == disk_bytes(tmp_path)
    assert not (tmp_path / "executables" / ("f" * 64)).exists()


def test_a_smaller_max_bytes_after_a_restart_evicts_down_to_it(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    for i in range(5):
        store.put(Digest.of(blob(i)), blob(i))
    # Closed first: its journal thread, left running, filed blobs beside the new store after
    # it had evicted them (a CI failure).
    store.close()
    assert DiskBlobStore(tmp_path, max_bytes=3000).total_bytes == 3000 == disk_bytes(tmp_path)


def test_ingest_fd_copies_the_whole_file_from_offset_zero_and_leaves_the_fd_open(
    tmp_path: Path,
) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=4 * MiB)
    data = os.urandom(MiB + 123)  # more than one chunk
    source = tmp_path / "output.bin"
    source.write_bytes(data)
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.lseek(fd, 1000, os.SEEK_SET)
        digest = store.ingest_fd(fd, "output out.bin")
        assert digest == Digest.of(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1000  # pread: the offset is untouched
        source.write_bytes(b"tampered")
        assert store.read(digest) == data
        assert stat.S_IMODE(store.blob_path(digest).stat().st_mode) == 0o444
        assert store.ingest_fd(fd, "again") == Digest.of(b"tampered")  # same fd, new content
    finally:
        os.close(fd)
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []
    assert store.reserved_bytes == 0


def test_ingest_fd_of_an_empty_file_is_the_empty_digest(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=MiB)
    (tmp_path / "empty").write_bytes(b"")
    fd = os.open(tmp_path / "empty", os.O_RDONLY)
    try:
        assert store.ingest_fd(fd, "empty output") == EMPTY_DIGEST
    finally:
        os.close(fd)


def test_ingest_fd_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=MiB)
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(InvalidArgument, match="fifo output is not a regular file"):
            store.ingest_fd(read_end, "fifo output")
    finally:
        os.close(read_end)
        os.close(write_end)


def test_ingest_fd_on_a_full_disk_is_resource_exhausted_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=MiB)
    (tmp_path / "out").write_bytes(b"x" * 5000)

    def disk_full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_store, "write_all", disk_full)
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        with pytest.raises(ResourceExhausted, match="disk full while storing output out"):
            store.ingest_fd(fd, "output out")
        assert os.fstat(fd).st_size == 5000  # still open
    finally:
        os.close(fd)
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []
    assert (store.total_bytes, store.reserved_bytes) == (0, 0)


def test_ingest_fd_larger_than_the_whole_cas_is_resource_exhausted(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=MiB)
    (tmp_path / "big").write_bytes(b"x" * (MiB + 1))
    fd = os.open(tmp_path / "big", os.O_RDONLY)
    try:
        with pytest.raises(ResourceExhausted):
            store.ingest_fd(fd, "output big")
    finally:
        os.close(fd)
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []
    assert store.reserved_bytes == 0


def test_reserved_bytes_evict_blobs_and_count_until_released(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=3000)
    digests = [Digest.of(blob(i)) for i in range(3)]
    for i, digest in enumerate(digests):
        store.put(digest, blob(i))
    reservation = store.reservation()
    reservation.grow(1500)  # evicts the two least recently used blobs
    assert store.find_missing(digests) == digests[:2]
    assert (store.total_bytes, store.reserved_bytes) == (1000, 1500)
    with pytest.raises(ResourceExhausted, match="CAS is full"):
        reservation.grow(2000)  # could not fit even with every blob evicted
    assert store.contains(digests[2])  # ...so nothing was evicted for it
    reservation.release()
    assert store.reserved_bytes == 0
