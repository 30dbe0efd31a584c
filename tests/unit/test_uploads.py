from __future__ import annotations

from pathlib import Path

import pytest

from worker.cas.disk_store import DiskBlobStore
from worker.cas.uploads import UploadTracker
from worker.digests import Digest
from worker.errors import InvalidArgument

DATA = b"0123456789" * 100
DIGEST = Digest.of(DATA)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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


def test_offset_that_does_not_continue_the_upload_is_rejected(tmp_path: Path) -> None:
    tracker = UploadTracker(DiskBlobStore(tmp_path, 1 << 20))
    upload = tracker.begin("u", DIGEST)
    tracker.append(upload, 0, DATA[:10])
    with pytest.raises(InvalidArgument, match="write_offset 20"):
        tracker.append(upload, 20, DATA[20:30])


def test_more_bytes_than_the_digest_size_are_rejected(tmp_path: Path) -> None:
    tracker = UploadTracker(DiskBlobStore(tmp_path, 1 << 20))
    with pytest.raises(InvalidArgument, match="more data"):
        tracker.append(tracker.begin("u", DIGEST), 0, DATA + b"!")


def test_finished_upload_that_does_not_match_its_digest_stores_nothing(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, 1 << 20)
    tracker = UploadTracker(store)
    upload = tracker.begin("u", DIGEST)
    tracker.append(upload, 0, b"X" * len(DATA))
    with pytest.raises(InvalidArgument, match="hashes to"):
        tracker.finish(upload)
    assert not store.contains(DIGEST)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_idle_partial_uploads_expire(tmp_path: Path) -> None:
    clock = Clock()
    tracker = UploadTracker(DiskBlobStore(tmp_path, 1 << 20), ttl_s=10, clock=clock)
    tracker.append(tracker.begin("old", DIGEST), 0, DATA[:5])
    clock.now = 11
    tracker.begin("new", DIGEST)
    assert tracker.committed_size("old", DIGEST) == 0
