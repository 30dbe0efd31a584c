"""Small file helpers the CAS's writers share: whole writes and reads of an open file, a
quiet unlink, and the error a client sees when a write fails.

The open flags are the CAS's own: a file it creates must be new (O_EXCL) and no name it opens
may be a symlink (O_NOFOLLOW).
"""

from __future__ import annotations

import contextlib
import logging
import os

from worker.errors import Internal, ResourceExhausted, ServiceError, raise_if_disk_full

log = logging.getLogger(__name__)

CHUNK = 1 << 20
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Writes all of data at `offset` of an open file, which may accept less per call."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]


def write_all(fd: int, data: bytes) -> None:
    """Writes all of data at an open file's offset, which may accept less per call."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_exactly(fd: int, size: int) -> bytes:
    """Up to `size` bytes from offset 0 of an open file (fewer if it is shorter)."""
    data = os.pread(fd, size, 0)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size and (more := os.pread(fd, size - got, got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def storage_error(error: OSError, what: str) -> ServiceError:
    """The error a client sees for a failed write: ResourceExhausted for a full disk."""
    try:
        raise_if_disk_full(error, what)
    except ResourceExhausted as full:
        return full
    log.error("cannot store %s: %s", what, error)
    return Internal(f"cannot store {what}: {error.strerror}")
