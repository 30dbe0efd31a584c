from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.concurrently import run_concurrently
from worker.cas.disk_store import DiskBlobStore
from worker.cas.uploads import UploadEnded, UploadTracker
from worker.digests import Digest
from worker.errors import InvalidArgument, ResourceExhausted

DATA = b"0123456789" * 100
DIGEST = Digest.of(DATA)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def open_fds_under(directory: Path) -> list[str]:
    """The files under `directory` this process has open."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the fd listdir itself used
            continue
    return [t for t in targets if t.startswith(f"{directory}/")]


def files_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def blob(n: int, size: int = 1000) -> bytes:
    return bytes([n % 256]) * size


def test_interrupted_upload_resumes_at_committed_size(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    tracker.append(tracker.begin("u", DIGEST), 0, DATA[:300])
    assert tracker.committed_size("u", DIGEST) == 300
    resumed = tracker.begin("u", DIGEST)
    tracker.append(resumed, 300, DATA[300:])
    tracker.finish(resumed)
    assert store.read(DIGEST) == DATA
    assert tracker.committed_size("u", DIGEST) == 0
    assert (store.total_bytes, store.reserved_bytes) == (len(DATA), 0)
    assert files_in(tmp_path / "tmp") == []


def test_offset_that_does_not_continue_the_upload_is_rejected(tmp_path: Path) -> None:
    tracker = UploadTracker(DiskBlobStore(tmp_path, 1 << 20))
    upload = tracker.begin("u", DIGEST)
    tracker.append(upload, 0, DATA[:10])
    with pytest.raises(InvalidArgument, match="write_offset 20"):
        tracker.append(upload, 20, DATA[20:30])
    tracker.append(upload, 10, DATA[10:])  # the upload itself carries on
    tracker.finish(upload)


def test_a_bad_first_offset_does_not_keep_an_empty_upload(tmp_path: Path) -> None:
    tracker = UploadTracker(DiskBlobStore(tmp_path, 1 << 20))
    with pytest.raises(InvalidArgument, match="write_offset 7"):
        tracker.append(tracker.begin("u", DIGEST), 7, DATA[7:20])
    assert len(tracker) == 0


def test_more_bytes_than_the_digest_size_are_rejected(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    with pytest.raises(InvalidArgument, match="more data"):
        tracker.append(tracker.begin("u", DIGEST), 0, DATA + b"!")
    assert store.reserved_bytes == 0


def test_finished_upload_that_does_not_match_its_digest_stores_nothing(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    upload = tracker.begin("u", DIGEST)
    tracker.append(upload, 0, b"X" * len(DATA))
    with pytest.raises(InvalidArgument, match="hashes to"):
        tracker.finish(upload)
    assert not store.contains(DIGEST)
    assert files_in(tmp_path / "tmp") == []
    assert store.reserved_bytes == 0


def test_idle_partial_uploads_expire_and_their_files_are_deleted(tmp_path: Path) -> None:
    clock = Clock()
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store, ttl_s=10, clock=clock)
    tracker.append(tracker.begin("old", DIGEST), 0, DATA[:5])
    assert len(files_in(tmp_path / "tmp")) == 1
    clock.now = 11
    tracker.begin("new", DIGEST)
    assert tracker.committed_size("old", DIGEST) == 0
    assert files_in(tmp_path / "tmp") == []
    assert store.reserved_bytes == 0


def test_partial_uploads_hold_no_file_descriptor_between_chunks(tmp_path: Path) -> None:
    """Each partial upload used to keep its temporary file open until it expired (an hour):
    about a thousand abandoned uploads and every later RPC failed with EMFILE."""
    tracker = UploadTracker(DiskBlobStore(tmp_path, 1 << 20))
    for n in range(50):
        tracker.append(tracker.begin(f"abandoned-{n}", DIGEST), 0, DATA[:100])
    assert len(tracker) == 50
    assert len(files_in(tmp_path / "tmp")) == 50  # the data is kept, by path
    assert open_fds_under(tmp_path) == []
    resumed = tracker.begin("abandoned-7", DIGEST)
    tracker.append(resumed, 100, DATA[100:])
    tracker.finish(resumed)
    assert open_fds_under(tmp_path) == []


def test_one_upload_more_than_the_limit_is_resource_exhausted_and_the_rest_carry_on(
    tmp_path: Path,
) -> None:
    clock = Clock()
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store, ttl_s=10, clock=clock, max_uploads=3)
    uploads = [tracker.begin(f"u{n}", DIGEST) for n in range(3)]
    for upload in uploads:
        tracker.append(upload, 0, DATA[:10])
    with pytest.raises(ResourceExhausted, match="3 uploads are already in progress"):
        tracker.begin("one-too-many", DIGEST)
    assert tracker.begin("u1", DIGEST) is uploads[1]  # resuming is not a new upload
    clock.now = 5
    tracker.append(uploads[1], 10, DATA[10:])
    tracker.finish(uploads[1])
    tracker.begin("fits-again", DIGEST)
    with pytest.raises(ResourceExhausted):
        tracker.begin("one-too-many", DIGEST)
    clock.now = 12  # u0 and u2 are stale now; fits-again is not
    tracker.begin("after-expiry", DIGEST)
    assert (tracker.committed_size("u0", DIGEST), tracker.committed_size("u2", DIGEST)) == (0, 0)
    assert files_in(tmp_path / "tmp") == []  # the live ones have no data yet
    assert store.reserved_bytes == 0


def test_partial_upload_bytes_count_toward_max_bytes_and_evict_lru_blobs(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=3000)
    old, recent = Digest.of(blob(1)), Digest.of(blob(2))
    store.put(old, blob(1))
    store.put(recent, blob(2))
    tracker = UploadTracker(store)
    data = blob(3, 1500)
    upload = tracker.begin("u", Digest.of(data))
    tracker.append(upload, 0, data[:1200])
    assert store.find_missing([old, recent]) == [old]  # 2000 + 1200 did not fit
    assert (store.total_bytes, store.reserved_bytes) == (1000, 1200)
    tracker.append(upload, 1200, data[1200:])
    tracker.finish(upload)
    assert (store.total_bytes, store.reserved_bytes) == (2500, 0)
    assert store.read(Digest.of(data)) == data


def test_partial_uploads_that_cannot_fit_are_resource_exhausted(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=3000)
    tracker = UploadTracker(store)
    big, other = blob(1, 2000), blob(2, 1500)
    holder = tracker.begin("holder", Digest.of(big))
    tracker.append(holder, 0, big)  # 2000 bytes held, not finished
    upload = tracker.begin("u", Digest.of(other))
    tracker.append(upload, 0, other[:1000])
    with pytest.raises(ResourceExhausted, match="CAS is full"):
        tracker.append(upload, 1000, other[1000:])
    # The refused upload is dropped, so it holds no space hostage; the other one carries on.
    assert (tracker.committed_size("u", Digest.of(other)), len(tracker)) == (0, 1)
    assert sum(p.stat().st_size for p in files_in(tmp_path / "tmp")) == 2000
    assert store.reserved_bytes == 2000
    tracker.abandon(holder)
    assert (store.reserved_bytes, files_in(tmp_path / "tmp")) == (0, [])
    retry = tracker.begin("u", Digest.of(other))
    tracker.append(retry, 0, other)
    tracker.finish(retry)
    assert store.read(Digest.of(other)) == other


def test_a_blob_larger_than_the_cas_is_refused_before_any_byte(tmp_path: Path) -> None:
    tracker = UploadTracker(DiskBlobStore(tmp_path, max_bytes=3000))
    with pytest.raises(ResourceExhausted, match="larger than the whole CAS"):
        tracker.begin("u", Digest("a" * 64, 3001))
    assert len(tracker) == 0


def test_stale_uploads_give_their_space_back_when_a_write_needs_it(tmp_path: Path) -> None:
    clock = Clock()
    store = DiskBlobStore(tmp_path, max_bytes=3000)
    tracker = UploadTracker(store, ttl_s=10, clock=clock)
    tracker.append(tracker.begin("stale", Digest.of(blob(1, 2500))), 0, blob(1, 2000))
    clock.now = 11
    store.put(Digest.of(blob(2, 1500)), blob(2, 1500))  # fits once the stale upload is gone
    assert len(tracker) == 0
    assert files_in(tmp_path / "tmp") == []


def test_a_second_stream_never_writes_to_an_upload_the_first_finished(tmp_path: Path) -> None:
    """REAPI: "if another client has already completed the upload (which may occur in the
    middle of a single upload ...)" the other stream must see that, not a closed file."""
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    stale = tracker.begin("u", DIGEST)  # a stream the client gave up on
    tracker.append(stale, 0, DATA[:100])
    retry = tracker.begin("u", DIGEST)  # the client's retry resumes the same upload
    tracker.append(retry, 100, DATA[100:])
    tracker.finish(retry)
    with pytest.raises(UploadEnded, match="finished or dropped"):
        tracker.append(stale, 100, DATA[100:200])
    with pytest.raises(UploadEnded):
        tracker.finish(stale)
    assert store.read(DIGEST) == DATA


def test_a_second_stream_never_writes_to_an_upload_the_first_dropped(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    first = tracker.begin("u", DIGEST)
    tracker.append(first, 0, DATA[:100])
    second = tracker.begin("u", DIGEST)
    with pytest.raises(InvalidArgument, match="more data"):
        tracker.append(second, 100, DATA[100:] + b"extra")
    with pytest.raises(UploadEnded):
        tracker.append(first, 100, DATA[100:200])
    fresh = tracker.begin("u", DIGEST)  # the same id starts over cleanly
    assert fresh is not first and fresh.committed == 0


def test_concurrent_streams_of_one_upload_take_turns(tmp_path: Path) -> None:
    """Eight threads race to continue the same upload from whatever it holds; each chunk is
    taken by exactly one of them, and the blob comes out right."""
    data = os.urandom(256 * 1024)
    digest = Digest.of(data)
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    chunk = 1024
    barrier = threading.Barrier(8)

    def stream() -> None:
        upload = tracker.begin("u", digest)
        barrier.wait()
        while (offset := upload.committed) < len(data):
            try:
                tracker.append(upload, offset, data[offset : offset + chunk])
            except UploadEnded:
                return
            except InvalidArgument as error:
                assert "does not continue" in str(error)

    assert run_concurrently(stream, threads=8) == []
    tracker.finish(tracker.begin("u", digest))
    assert store.read(digest) == data


def test_partial_data_lost_behind_our_back_is_never_stored_with_a_hole(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    upload = tracker.begin("u", DIGEST)
    tracker.append(upload, 0, DATA[:100])
    (tmp_path / "tmp" / Path(upload.path).name).unlink()
    with pytest.raises(UploadEnded, match="was lost"):
        tracker.append(upload, 100, DATA[100:])
    assert not store.contains(DIGEST)
    assert (len(tracker), store.reserved_bytes, files_in(tmp_path / "tmp")) == (0, 0, [])
    truncated = tracker.begin("v", DIGEST)
    tracker.append(truncated, 0, DATA)
    os.truncate(truncated.path, 10)
    with pytest.raises(UploadEnded, match="was damaged"):
        tracker.finish(truncated)
    assert not store.contains(DIGEST)
    assert (len(tracker), store.reserved_bytes, files_in(tmp_path / "tmp")) == (0, 0, [])
