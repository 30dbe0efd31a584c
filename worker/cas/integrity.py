"""Checking stored blob files against their digests: hashing, and the stat signature that
lets a blob verified once skip rehashing until its file changes."""

from __future__ import annotations

import hashlib
import os

from worker.errors import DataLoss, NotFound

HASH_CHUNK = 1 << 20

# What a blob file looked like (inode, size, mtime in ns) when its bytes were last found to
# match its digest. Writing to the file changes its mtime, truncating changes its size,
# replacing it changes its inode. The ctime is left out on purpose: every hard link staging
# makes into an exec root (and every unlink of one) changes it without touching the bytes.
Signature = tuple[int, int, int]


class BlobDamaged(DataLoss, NotFound):
    """A stored blob's bytes no longer match its digest; it has been removed. To a client
    reading it this is DATA_LOSS; to code that needs the blob it is simply not there."""


def signature_of(info: os.stat_result) -> Signature:
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def hash_fd(fd: int, size_hint: int = 0) -> tuple[str, int]:
    """SHA-256 and length of everything in an open file, read with pread from offset 0 (the
    fd's own offset is left alone). hashlib drops the GIL for big updates, so this runs
    in parallel with the event loop."""
    hasher = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK if not 0 < size_hint < HASH_CHUNK else size_hint + 1)
    view = memoryview(buffer)
    offset = 0
    while True:
        n = os.preadv(fd, [buffer], offset)
        if n == 0:
            return hasher.hexdigest(), offset
        hasher.update(view[:n])
        offset += n
