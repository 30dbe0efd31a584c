"""Reading a stored blob in chunks, checked against its digest on the way."""

from __future__ import annotations

import hashlib
import os
from typing import NoReturn

from worker.cas.disk_store import DiskBlobStore
from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import NotFound


class BlobReader:
    """One read of a blob (or of `limit` bytes from `offset`), a chunk per call.

    A read of the whole blob hashes what it reads, and the chunk that completes it is
    handed out only once the hash matched: a damaged blob ends in BlobDamaged (and is
    removed) instead of its last bytes. A read of part of a blob cannot hash as it goes,
    so the file is checked first (unless it is unchanged since it was last known good).

    Blocking: run every call in a worker thread, one at a time; close() when done.
    """

    def __init__(self, store: DiskBlobStore, digest: Digest, offset: int, limit: int) -> None:
        self._store = store
        self._digest = digest
        self._offset = offset
        self.remaining = digest.size - offset if limit == 0 else min(limit, digest.size - offset)
        self._fd = -1
        self._info: os.stat_result | None = None
        self._memory: bytes | None = None
        whole = offset == 0 and self.remaining == digest.size
        self._hasher = hashlib.sha256() if whole else None
        if digest.is_empty and digest != EMPTY_DIGEST:
            raise NotFound(f"blob {digest} is not in the CAS")
        if not digest.is_empty and self.remaining <= 0 and not store.contains(digest):
            raise NotFound(f"blob {digest} is not in the CAS")  # even with nothing to read
        if digest.is_empty or self.remaining <= 0:
            self.remaining = 0
            return
        self._memory = store.pending_data(digest) if store.contains(digest) else None
        if self._memory is not None:
            self._hasher = None  # hashed on the way in, held in memory since
            return
        self._fd, self._info = store.open_fd(digest)
        if not whole:
            try:
                store.check_open(digest, self._fd, self._info)
            except BaseException:
                self.close()
                raise

    def read(self, size: int) -> bytes:
        """The next chunk of at most `size` bytes; b"" at the end."""
        if self.remaining <= 0:
            return b""
        if self._memory is not None:
            n = min(size, self.remaining)
            data = self._memory[self._offset : self._offset + n]
            self._offset += n
            self.remaining -= n
            return data
        data = os.pread(self._fd, min(size, self.remaining), self._offset)
        if not data:  # The file is shorter than the digest says: it changed under us.
            self._damaged()
        self._offset += len(data)
        self.remaining -= len(data)
        if self._hasher is not None:
            self._hasher.update(data)
            if self.remaining == 0:
                if self._hasher.hexdigest() != self._digest.hash:
                    self._damaged()
                assert self._info is not None
                self._store.mark_good(self._digest.hash, self._info)
        return data

    def _damaged(self) -> NoReturn:
        assert self._info is not None
        self.remaining = 0
        self._store.discard_damaged(self._digest, self._info.st_ino)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
