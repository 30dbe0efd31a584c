"""The small-blob journal: append-only files under `<cas>/journal/` that hold small blobs from
the moment they are acknowledged until they are files of their own.

Creating a file and renaming it into place costs two directory updates per blob, which on
a busy filesystem is 50-300 us each: a batch of a thousand 1 KiB blobs spent most of its time
there. A journal append is one write for a whole request, so that is what a client waits
for; a background thread then turns the blobs into files (staging hard-links them, so they
must become files). A crash between the two loses nothing: at startup every intact record
is turned into its file before the store opens, and the journal is deleted.

A record is a header (magic, the raw SHA-256, the size) and the bytes. Replay stops in a
segment at the first record that is cut short or does not hash to its header, which is
where a crash in the middle of an append leaves off; nothing after it was acknowledged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.cas.durability import Durability, flush_data, flush_directories

_HEADER = struct.Struct("<4s32sQ")
_MAGIC = b"CASj"
SEGMENT_BYTES = 32 << 20  # a new segment starts once the current one is this big
MAX_RECORD_BYTES = 1 << 20  # larger blobs are never journalled


@dataclass(eq=False)
class Segment:
    """One journal file; deleted once sealed (no more appends) and every record in it is a
    file or gone (evicted)."""

    path: str
    fd: int
    size: int = 0
    outstanding: int = 0
    sealed: bool = False


class Journal:
    def __init__(self, directory: Path, durability: Durability) -> None:
        self._directory = directory
        self._durability = durability
        self._lock = threading.Lock()
        self._current: Segment | None = None
        self._next = 0
        directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def replay(directory: Path) -> Iterator[tuple[str, bytes]]:
        """(hash, bytes) of every intact record, oldest segment first."""
        if not directory.is_dir():
            return
        for path in sorted(directory.iterdir(), key=lambda p: (len(p.name), p.name)):
            data = path.read_bytes()
            offset = 0
            while offset + _HEADER.size <= len(data):
                magic, raw_hash, size = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                blob = data[start : start + size]
                if (
                    magic != _MAGIC
                    or size > MAX_RECORD_BYTES
                    or len(blob) != size
                    or hashlib.sha256(blob).digest() != raw_hash
                ):
                    break  # cut short by a crash: nothing from here on was acknowledged
                yield raw_hash.hex(), blob
                offset = start + size

    @staticmethod
    def remove_all(directory: Path) -> None:
        if directory.is_dir():
            for path in directory.iterdir():
                path.unlink()

    def append(self, blobs: list[tuple[str, bytes]]) -> Segment:
        """Appends the blobs in one write (flushed to disk first under the fsync policy) and
        returns the segment that holds them; each counts as outstanding until done()."""
        parts: list[bytes] = []
        total = 0
        for hash_, data in blobs:
            parts.append(_HEADER.pack(_MAGIC, bytes.fromhex(hash_), len(data)))
            parts.append(data)
            total += _HEADER.size + len(data)
        record = memoryview(b"".join(parts))
        with self._lock:
            segment = self._current
            if segment is None or segment.size + total > SEGMENT_BYTES:
                segment = self._rotate_locked()
            try:
                written = 0
                while written < total:
                    written += os.write(segment.fd, record[written:])
                flush_data(segment.fd, self._durability)
            except OSError:
                # The segment may end in part of a record now, and replay stops there: no
                # record may follow it. (Its earlier records still count.)
                self._seal_locked(segment)
                if segment.outstanding == 0:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(segment.path)
                raise
            segment.size += total
            segment.outstanding += len(blobs)
        return segment

    def done(self, segment: Segment, count: int = 1) -> None:
        """`count` records of the segment are files now (or were evicted)."""
        with self._lock:
            segment.outstanding -= count
            if segment.outstanding == 0 and segment is self._current and segment.size > 0:
                self._seal_locked(segment)
            if segment.sealed and segment.outstanding == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(segment.path)

    def _rotate_locked(self) -> Segment:
        full = self._current
        if full is not None:
            self._seal_locked(full)  # which forgets it as the current segment
            if full.outstanding == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(full.path)
        path = f"{self._directory}/{self._next}"
        self._next += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        flush_directories([str(self._directory)], self._durability)
        self._current = Segment(path, fd)
        return self._current

    def _seal_locked(self, segment: Segment) -> None:
        if not segment.sealed:
            segment.sealed = True
            os.close(segment.fd)
            if segment is self._current:
                self._current = None
