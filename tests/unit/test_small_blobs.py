"""The journalled side of the disk CAS (worker.cas.small_blobs): flush really waits for the
background thread, and a failed write leaves no temporary file behind."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.cas import fileio, small_blobs
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskBlobStore]:
    store = DiskBlobStore(tmp_path, max_bytes=64 * MiB)
    yield store
    store.close()


def put_small(store: DiskBlobStore, count: int) -> list[bytes]:
    datas = [os.urandom(1024) for _ in range(count)]
    for data in datas:
        store.put(Digest.of(data), data)
    return datas


def test_flush_returns_only_once_the_background_threads_batch_is_done(
    store: DiskBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test (or a shutdown) that flushes and then looks at tmp/ must not find a file the
    background thread is still writing (a CI failure came from exactly that)."""
    in_background = threading.Event()
    release = threading.Event()
    write_all = fileio.write_all

    def slow_in_background(fd: int, data: bytes) -> None:
        # This store's thread only: stores other tests left open have threads of that name.
        ours = os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
        if ours and threading.current_thread().name == "cas-journal":
            in_background.set()
            release.wait(10)
        write_all(fd, data)

    monkeypatch.setattr(small_blobs, "write_all", slow_in_background)
    datas = put_small(store, 3)
    assert in_background.wait(10), "the background thread never started a batch"
    flushed = threading.Event()

    def flush() -> None:
        store.flush()
        flushed.set()

    flusher = threading.Thread(target=flush)
    flusher.start()
    assert not flushed.wait(0.5), "flush returned while the background batch was in progress"
    release.set()
    flusher.join(10)
    assert flushed.is_set()
    assert list((tmp_path / "tmp").iterdir()) == []
    for data in datas:
        assert Path(store.hash_path(Digest.of(data).hash)).read_bytes() == data


def test_a_write_that_fails_leaves_no_temporary_file(
    store: DiskBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk the background thread retries every second; each try must not leave
    its half-written file behind."""
    calls = 0
    write_all = fileio.write_all
    here = threading.current_thread()

    def full_on_the_second(fd: int, data: bytes) -> None:
        nonlocal calls
        if threading.current_thread() is not here:  # another store's thread in this process
            write_all(fd, data)
            return
        calls += 1
        if calls == 2:
            os.write(fd, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(small_blobs, "_MATERIALIZE_DELAY_S", 5.0)  # keep the thread out
    monkeypatch.setattr(small_blobs, "write_all", full_on_the_second)
    datas = put_small(store, 3)
    with pytest.raises(OSError):
        store.flush()
    assert list((tmp_path / "tmp").iterdir()) == []
    monkeypatch.setattr(small_blobs, "write_all", write_all)
    store.flush()  # the disk has room again: every blob becomes a file
    assert list((tmp_path / "tmp").iterdir()) == []
    for data in datas:
        assert Path(store.hash_path(Digest.of(data).hash)).read_bytes() == data


def test_a_rename_that_fails_leaves_no_temporary_file_and_the_rest_is_done_later(
    store: DiskBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blobs placed before the failure are files and their journal records done; the
    rest stay pending (served, tried again) and none of their files is left in tmp/."""
    replace = os.replace
    calls = 0

    def fails_on_the_second(source: str, target: str) -> None:
        nonlocal calls
        if not source.startswith(f"{tmp_path}/"):  # not this store's: another test's thread
            replace(source, target)
            return
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(small_blobs, "_MATERIALIZE_DELAY_S", 5.0)  # keep the thread out
    monkeypatch.setattr(os, "replace", fails_on_the_second)
    datas = put_small(store, 4)
    with pytest.raises(OSError):
        store.flush()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert Path(store.hash_path(Digest.of(datas[0]).hash)).read_bytes() == datas[0]
    assert all(store.read(Digest.of(data)) == data for data in datas)
    monkeypatch.setattr(os, "replace", replace)
    store.flush()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "journal").iterdir()) == []  # every record done, segment gone
    for data in datas:
        assert Path(store.hash_path(Digest.of(data).hash)).read_bytes() == data
