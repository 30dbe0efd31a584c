"""A stored blob whose bytes no longer match its digest is never handed out: reads hash,
staging checks files that changed, `cas verify` checks everything; and the small-blob
journal brings back what was acknowledged before a crash, and nothing torn."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from worker.cas import disk_store, integrity, journal
from worker.cas.disk_store import DiskBlobStore
from worker.cas.integrity import BlobDamaged
from worker.cas.reader import BlobReader
from worker.cas.verify import Progress, verify_cas
from worker.digests import Digest
from worker.errors import FailedPrecondition, NotFound
from worker.execution.inputs import DirectoryCache, load_input_tree
from worker.reapi import re_pb2

MiB = 1 << 20


def stored(store: DiskBlobStore, data: bytes) -> Digest:
    digest = Digest.of(data)
    store.put(digest, data)
    store.flush()
    return digest


def flip_a_byte(path: Path, at: int = 0) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate(path: Path, size: int) -> None:
    os.chmod(path, 0o644)
    os.truncate(path, size)


def overwrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records every file the store hashes to check it (a spy around the real hashing)."""
    hashed: list[int] = []

    def counting_hash_fd(fd: int, size_hint: int = 0) -> tuple[str, int]:
        hashed.append(fd)
        return integrity.hash_fd(fd, size_hint)

    monkeypatch.setattr(disk_store, "hash_fd", counting_hash_fd)
    return hashed


DAMAGE = {
    "flipped byte": lambda path, other: flip_a_byte(path, 3),
    "truncated": lambda path, other: truncate(path, 10),
    "another blob's bytes": lambda path, other: overwrite(path, other),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_read_of_a_damaged_blob_is_data_loss_and_the_blob_is_gone_afterwards(
    tmp_path: Path, damage: str
) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    data, other = os.urandom(5000), os.urandom(5000)
    digest = stored(store, data)
    stored(store, other)
    DAMAGE[damage](store.blob_path(digest), other)
    with pytest.raises(BlobDamaged, match="damaged"):
        store.read(digest)
    assert not store.contains(digest)
    assert not store.blob_path(digest).exists()
    assert store.total_bytes == len(other)
    store.put(digest, data)  # and it can be stored again
    assert store.read(digest) == data


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_whole_read_in_chunks_withholds_the_last_chunk_of_a_damaged_blob(
    tmp_path: Path, damage: str
) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=16 * MiB)
    data, other = os.urandom(3 * MiB), os.urandom(3 * MiB)
    digest = stored(store, data)
    DAMAGE[damage](store.blob_path(digest), other)
    handed_out = b""
    with pytest.raises(BlobDamaged):
        reader = BlobReader(store, digest, 0, 0)
        try:
            while chunk := reader.read(MiB):
                handed_out += chunk
        finally:
            reader.close()
    assert len(handed_out) < len(data)
    assert not store.contains(digest)


def test_a_partial_read_checks_the_file_first_unless_it_is_known_good(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=16 * MiB)
    data = os.urandom(2 * MiB)
    digest = stored(store, data)
    reader = BlobReader(store, digest, MiB, 100)
    assert reader.read(MiB) == data[MiB : MiB + 100]
    reader.close()
    flip_a_byte(store.blob_path(digest), 5)  # far from the range that is read
    with pytest.raises(BlobDamaged):
        BlobReader(store, digest, MiB, 100)
    assert not store.contains(digest)


def test_staging_checks_only_files_that_changed_and_hard_links_do_not_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=16 * MiB)
    digests = [stored(store, os.urandom(1000 + i)) for i in range(5)]
    hashed = count_hashing(monkeypatch)
    # Written by the store: known good, nothing is read again, even after hard links to the
    # files were made (which changes their ctime).
    for i, digest in enumerate(digests):
        os.link(store.hash_path(digest.hash), tmp_path / f"link{i}")
    assert store.find_missing_or_damaged(digests) == []
    assert hashed == []
    # One file changed: only it is hashed, found damaged and reported missing.
    flip_a_byte(store.blob_path(digests[2]))
    assert store.find_missing_or_damaged(digests) == [digests[2]]
    assert len(hashed) == 1
    assert not store.contains(digests[2])


def test_after_a_restart_each_file_is_hashed_once_then_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=16 * MiB)
    digests = [stored(store, os.urandom(1000 + i)) for i in range(3)]
    reopened = DiskBlobStore(tmp_path, max_bytes=16 * MiB)
    hashed = count_hashing(monkeypatch)
    assert reopened.find_missing_or_damaged(digests) == []
    assert len(hashed) == 3
    assert reopened.find_missing_or_damaged(digests) == []
    assert len(hashed) == 3


def test_an_input_tree_with_a_damaged_file_fails_with_a_missing_violation(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=16 * MiB)
    good, bad = stored(store, b"good input\n"), stored(store, b"input that rots\n")
    root = re_pb2.Directory(
        files=[
            re_pb2.FileNode(name="a", digest=good.to_proto()),
            re_pb2.FileNode(name="b", digest=bad.to_proto()),
        ]
    )
    root_digest = stored(store, root.SerializeToString())
    load_input_tree(DirectoryCache(store), store, root_digest)
    overwrite(store.blob_path(bad), b"input that ROTS\n")
    with pytest.raises(FailedPrecondition) as caught:
        load_input_tree(DirectoryCache(store), store, root_digest)
    assert caught.value.missing == [bad.subject()]


def test_a_damaged_executable_copy_is_made_again_from_its_blob(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    digest = stored(store, b"#!/bin/sh\necho hi\n")
    exe = store.require_executable(digest)
    overwrite(exe, b"#!/bin/sh\nrm -rf /\n")
    again = store.require_executable(digest)
    assert again.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert store.total_bytes == 2 * digest.size


def test_verify_removes_damaged_files_and_counts_the_rest(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    digests = [stored(store, os.urandom(100 + i)) for i in range(10)]
    store.require_executable(digests[0])
    flip_a_byte(store.blob_path(digests[1]))
    truncate(store.blob_path(digests[2]), 1)
    overwrite(store.blob_path(digests[3]), os.urandom(103))
    (tmp_path / "blobs" / "00" / "not-a-blob").write_bytes(b"stray")
    seen: list[Progress] = []
    report = verify_cas(tmp_path, report_progress=seen.append, every_s=0)
    assert sorted(report.damaged) == sorted(
        [
            *(f"blobs/{d.hash[:2]}/{d.hash}" for d in digests[1:4]),
            "blobs/00/not-a-blob",
        ]
    )
    assert report.checked == 12
    assert seen[-1].done == seen[-1].total == 12
    for digest in digests[1:4]:
        assert not os.path.exists(store.hash_path(digest.hash))
    assert verify_cas(tmp_path).damaged == []
    # The store notices the files are gone the next time it needs them.
    assert store.find_missing_or_damaged(digests) == digests[1:4]
    assert (
        store.total_bytes
        == sum(d.size for d in digests) - sum(d.size for d in digests[1:4]) + digests[0].size
    )


def test_verify_dry_run_removes_nothing(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    digest = stored(store, b"x" * 100)
    flip_a_byte(store.blob_path(digest))
    assert len(verify_cas(tmp_path, remove=False).damaged) == 1
    assert store.blob_path(digest).exists()


def test_journalled_blobs_come_back_after_a_crash_and_a_torn_record_does_not(
    tmp_path: Path,
) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    datas = [os.urandom(500 + i) for i in range(20)]
    # As a crash would leave them: in the journal, not yet files (nothing materializes
    # them, since this store is never used again).
    records = [(Digest.of(d).hash, d) for d in datas]
    store._small.journal.append(records)
    segment = tmp_path / "journal" / "0"
    torn = os.urandom(300)
    with open(segment, "ab") as f:  # a record cut short by the crash
        header = struct.pack("<4s32sQ", b"CASj", bytes.fromhex(Digest.of(torn).hash), 300)
        f.write(header + torn[:100])
    reopened = DiskBlobStore(tmp_path, max_bytes=MiB)
    assert [reopened.read(Digest.of(d)) for d in datas] == datas
    assert not reopened.contains(Digest.of(torn))
    assert reopened.total_bytes == sum(len(d) for d in datas)
    assert list((tmp_path / "journal").iterdir()) == []
    assert all(reopened.blob_path(Digest.of(d)).exists() for d in datas)


def test_small_blobs_are_served_from_the_journal_until_they_are_files(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    data = os.urandom(journal.MAX_RECORD_BYTES // 64)
    digest = Digest.of(data)
    store.put(digest, data)
    assert store.read(digest) == data
    reader = BlobReader(store, digest, 10, 20)
    assert reader.read(100) == data[10:30]
    reader.close()
    store.flush()
    assert list((tmp_path / "journal").iterdir()) == []
    assert store.hash_path(digest.hash) == str(store.blob_path(digest))
    assert Path(store.hash_path(digest.hash)).read_bytes() == data


def test_a_missing_blob_is_not_found_not_damaged(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    with pytest.raises(NotFound) as caught:
        store.read(Digest.of(b"never stored"))
    assert not isinstance(caught.value, BlobDamaged)


def test_after_a_failed_journal_append_no_record_follows_the_torn_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    before, lost, after = os.urandom(700), os.urandom(800), os.urandom(900)
    store._small.journal.append([(Digest.of(before).hash, before)])
    real_write = os.write

    def short_then_full_disk(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data)[:50])  # part of the record reaches the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full_disk)
    with pytest.raises(OSError):
        store._small.journal.append([(Digest.of(lost).hash, lost)])
    monkeypatch.undo()
    store._small.journal.append([(Digest.of(after).hash, after)])
    reopened = DiskBlobStore(tmp_path, max_bytes=MiB)
    assert reopened.read(Digest.of(before)) == before
    assert reopened.read(Digest.of(after)) == after
    assert not reopened.contains(Digest.of(lost))


def test_evicting_journalled_blobs_deletes_their_journal_once_all_are_gone(
    tmp_path: Path,
) -> None:
    store = DiskBlobStore(tmp_path, max_bytes=3000)
    first = [os.urandom(1000) for _ in range(3)]
    store.put_many([(Digest.of(d).hash, len(d), d) for d in first])
    store.put_many([(Digest.of(d).hash, len(d), d) for d in [os.urandom(1000) for _ in range(3)]])
    store.flush()
    assert not any(store.contains(Digest.of(d)) for d in first)
    assert store.total_bytes == 3000
    assert list((tmp_path / "journal").iterdir()) == []
    assert sum(1 for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == 3


def test_a_full_journal_segment_rotates_while_its_blobs_are_not_files_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More small blobs than one segment holds, acknowledged before any became a file: the
    journal starts a new segment (this raised AttributeError once, failing the upload), and
    after a crash every blob of both segments comes back."""
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 4096)
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    datas = [os.urandom(1500 + i) for i in range(6)]
    for data in datas:  # as the materializer would leave them if it lagged: not yet files
        store._small.journal.append([(Digest.of(data).hash, data)])
    assert len(list((tmp_path / "journal").iterdir())) >= 2
    reopened = DiskBlobStore(tmp_path, max_bytes=MiB)
    assert [reopened.read(Digest.of(d)) for d in datas] == datas


def test_batches_larger_than_a_segment_are_stored_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 8192)
    store = DiskBlobStore(tmp_path, max_bytes=MiB)
    batches = [[os.urandom(1000 + i) for i in range(10)] for _ in range(4)]
    for batch in batches:
        assert store.put_many([(Digest.of(d).hash, len(d), d) for d in batch]) == [None] * len(
            batch
        )
    store.flush()
    assert all(store.read(Digest.of(d)) == d for batch in batches for d in batch)
    assert list((tmp_path / "journal").iterdir()) == []
