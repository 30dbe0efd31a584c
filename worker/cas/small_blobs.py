"""The journalled side of the on-disk CAS: small blobs from the moment they are in the journal
(worker.cas.journal) until they are files of their own.

A DiskBlobStore owns one SmallBlobs. It holds the blobs that are acknowledged and indexed but
not yet files (served from memory meanwhile), runs the background thread that turns them into
files, and at startup turns what the last run left in the journal into files. The store keeps
the index (sizes, LRU order, known-good signatures); this keeps the pending map, the journal
and the thread. Both are guarded by the store's one lock, which this shares (and waits on,
through a condition built on it); it adds no lock of its own (the journal's appends and
releases are serialized by the journal's own lock, taken after the store's when both are).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cas.durability import flush_data, flush_directories
from worker.cas.fileio import NEW_FILE, unlink_if_present, write_all
from worker.cas.integrity import signature_of
from worker.cas.journal import Journal, Segment
from worker.digests import Digest

if TYPE_CHECKING:
    from worker.cas.disk_store import DiskBlobStore

log = logging.getLogger(__name__)

# Blobs up to this size are acknowledged once in the journal and become files in the
# background (worker.cas.journal); at most PENDING_LIMIT bytes of them wait at a time.
JOURNAL_MAX_BLOB = 64 * 1024
PENDING_LIMIT = 64 << 20
_MATERIALIZE_GROUP = 256
_MATERIALIZE_DELAY_S = 0.05


@dataclass(eq=False, slots=True)
class PendingBlob:
    """A blob in the journal and in memory, not yet a file."""

    data: bytes
    segment: Segment


class SmallBlobs:
    """The blobs of a store that are in its journal but not yet files, and the background
    thread that makes them files.

    `pending` (hash -> PendingBlob) and everything else here is guarded by the store's lock;
    the methods named `..._locked` expect it held, the others take it where they need it.
    """

    def __init__(self, store: DiskBlobStore, directory: Path) -> None:
        """Turns what the last run left in the journal at `directory` into files, then starts
        a new journal there (before the store reads its index from the files)."""
        self._store = store
        self._lock = store._lock
        self.pending: dict[str, PendingBlob] = {}  # indexed, in the journal, not yet files
        self._pending_bytes = 0
        self._work = threading.Condition(self._lock)
        # Batches being made into files right now (taken under the lock, counted until their
        # temporary files are renamed or removed), and the condition that says one ended.
        self._in_flight = 0
        self._batch_ended = threading.Condition(self._lock)
        self._materializer: threading.Thread | None = None
        self._closed = False
        self._replay(directory)
        self.journal = Journal(directory, store.durability)

    def _replay(self, directory: Path) -> None:
        """Turns every intact journal record left by the last run into its file, then
        deletes the journal (before the index is read from the files)."""
        store = self._store
        placed: list[str] = []
        for hash_, data in Journal.replay(directory):
            target = store.hash_path(hash_)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(target).st_size == len(data):
                    continue
            temp = store._numbered_temp_path("replay-")
            fd = os.open(temp, NEW_FILE, 0o444)
            try:
                write_all(fd, data)
                flush_data(fd, store.durability)
            finally:
                os.close(fd)
            os.replace(temp, target)
            placed.append(target)
        flush_directories((os.path.dirname(path) for path in placed), store.durability)
        Journal.remove_all(directory)
        if placed:
            log.info("CAS journal: %d blobs of the last run made into files", len(placed))

    def append(self, records: list[tuple[str, bytes]]) -> Segment | None:
        """Appends (hash, bytes) records to the journal in one write, if they fit in memory
        beside the blobs already waiting (PENDING_LIMIT). None if they do not, or if the
        append failed: the caller then writes them to files directly. (The room is checked
        without the lock: concurrent appends may overshoot the limit by up to one request's
        small blobs per CAS thread, io_threads.THREADS x server.max_message_bytes at worst.)"""
        size = sum(len(data) for _, data in records)
        if self._pending_bytes + size > PENDING_LIMIT:
            return None
        try:
            return self.journal.append(records)
        except OSError as error:
            log.warning("CAS journal: append failed (%s); writing files directly", error)
            return None

    def add_many_locked(self, blobs: list[tuple[str, bytes]], segment: Segment) -> None:
        """Holds blobs just appended to `segment` (and indexed by the store) until they are
        files (lock held)."""
        pending = self.pending
        for hash_, data in blobs:
            pending[hash_] = PendingBlob(data, segment)
            self._pending_bytes += len(data)

    def wake_locked(self) -> None:
        """Tells the background thread there is work, starting it the first time (lock
        held)."""
        if self._materializer is None:
            self._materializer = threading.Thread(
                target=self._materialize_forever, name="cas-journal", daemon=True
            )
            self._materializer.start()
        self._work.notify()

    def drop_locked(self, hash_: str) -> None:
        """Forgets a blob the store drops from its index (evicted or damaged) if it is still
        only in the journal; its record is done (lock held)."""
        entry = self.pending.pop(hash_, None)
        if entry is not None:
            self._pending_bytes -= len(entry.data)
            self.journal.done(entry.segment)

    def make_file(self, hash_: str) -> None:
        """Makes the blob a file now if it is still only in the journal."""
        with self._lock:
            batch = self._take_locked([hash_])
        if batch:
            self._materialize(batch)

    def data(self, digest: Digest) -> bytes | None:
        """The bytes of a blob that is still only in the journal (None otherwise)."""
        with self._lock:
            entry = self.pending.get(digest.hash)
        return entry.data if entry is not None and len(entry.data) == digest.size else None

    def flush(self) -> None:
        """Makes every blob still only in the journal a file, and waits for the background
        thread's batch in progress: once this returns, no temporary file of the journal's is
        left in the store's `tmp/` (tests, shutdown)."""
        while True:
            with self._lock:
                while not (batch := self._take_locked()) and self._in_flight:
                    self._batch_ended.wait()
            if not batch:
                return
            self._materialize(batch)

    def _take_locked(self, hashes: list[str] | None = None) -> list[tuple[str, PendingBlob]]:
        """The next batch of pending blobs to make into files (those of `hashes`, or the
        first _MATERIALIZE_GROUP), counted as in flight until _materialize ends (lock held)."""
        if hashes is None:
            batch = list(itertools.islice(self.pending.items(), _MATERIALIZE_GROUP))
        else:
            batch = [(h, self.pending[h]) for h in hashes if h in self.pending]
        if batch:
            self._in_flight += 1
        return batch

    def _materialize_forever(self) -> None:
        """The background thread that turns journalled blobs into files."""
        while True:
            with self._lock:
                while not self.pending and not self._closed:
                    self._work.wait()
                few = len(self.pending) < _MATERIALIZE_GROUP // 4
            if few:
                # Let a trickle of single writes gather: one wake-up per group of files, not
                # one per blob (each costs the event loop a GIL hand-over).
                time.sleep(_MATERIALIZE_DELAY_S)
            with self._lock:
                if self._closed:
                    return
                batch = self._take_locked()
            if not batch:
                continue  # flushed by another thread meanwhile
            try:
                self._materialize(batch)
            except Exception:
                if not self._store._tmp.is_dir():
                    return  # The store's directory was removed under it: nothing to do.
                log.exception("CAS journal: cannot make blobs into files yet; retrying")
                time.sleep(1)

    def close(self) -> None:
        """Makes every journalled blob a file (so a clean stop leaves no journal behind) and
        stops the background thread, waiting for it (a hung disk hangs this too). If making
        the files fails (a full disk), the journal keeps them for the next start, as it does
        a small blob that a request still running in a CAS thread stores after this."""
        try:
            self.flush()
        except OSError as error:
            log.warning("CAS journal: blobs left in the journal for the next start: %s", error)
        with self._lock:
            self._closed = True
            self._work.notify_all()
            materializer = self._materializer
        if materializer is not None and materializer is not threading.current_thread():
            materializer.join()

    def _materialize(self, batch: list[tuple[str, PendingBlob]]) -> None:
        """Makes a batch taken with _take_locked into files; it is no longer in flight once
        this returns or raises."""
        try:
            self._write_and_place(batch)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._batch_ended.notify_all()

    def _write_and_place(self, batch: list[tuple[str, PendingBlob]]) -> None:
        """Writes journalled blobs to files and renames them into place (those still pending:
        another thread may have done it, or eviction dropped them, meanwhile); their journal
        records are done once the files are (under fsync: durably) there. A write or rename
        that fails (a full disk) leaves none of the batch's temporary files behind."""
        store = self._store
        written: list[tuple[str, PendingBlob, str, os.stat_result]] = []
        half_written = ""
        try:
            for hash_, entry in batch:
                temp = store._numbered_temp_path("journal-")
                fd = os.open(temp, NEW_FILE, 0o444)
                half_written = temp
                try:
                    write_all(fd, entry.data)
                    flush_data(fd, store.durability)
                    info = os.fstat(fd)
                finally:
                    os.close(fd)
                written.append((hash_, entry, temp, info))
                half_written = ""
        except OSError:
            for made in [half_written, *(temp for _, _, temp, _ in written)]:
                if made:
                    unlink_if_present(made)
            raise
        placed: list[str] = []
        finished: list[Segment] = []
        leftover = {temp for _, _, temp, _ in written}  # until each is renamed into place
        try:
            with self._lock:
                for hash_, entry, temp, info in written:
                    if self.pending.get(hash_) is not entry:
                        continue
                    target = store.hash_path(hash_)
                    os.replace(temp, target)
                    leftover.discard(temp)
                    placed.append(target)
                    del self.pending[hash_]
                    self._pending_bytes -= len(entry.data)
                    store._good[hash_] = signature_of(info)
                    finished.append(entry.segment)
        finally:
            # A rename that failed leaves the rest pending (tried again later) and removes
            # their files; what was placed is done all the same.
            for temp in leftover:
                unlink_if_present(temp)
            flush_directories((os.path.dirname(path) for path in placed), store.durability)
            for segment in finished:
                self.journal.done(segment)
