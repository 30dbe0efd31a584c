"""The CAS's durability policy: what is forced to disk before a blob is acknowledged.

`none`: blob data and names reach the disk when the kernel writes them back (seconds later).
A crash of the service (even SIGKILL) loses nothing acknowledged, since the page cache
survives it; a crash of the whole host may lose blobs acknowledged shortly before it, and
may leave a blob file torn. Such a file is never served: reads and staging check contents.

`fsync`: a blob's data is flushed (fdatasync) before it is renamed into place, and the
directory holding its name is flushed after, before the client hears "stored"; action
cache entries too. An acknowledged blob survives a host crash. It costs a disk flush per
blob (a batch pays one data flush per blob and one per directory it touched).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Literal

Durability = Literal["none", "fsync"]
DURABILITY_LEVELS: tuple[Durability, ...] = ("none", "fsync")


def flush_data(fd: int, durability: Durability) -> None:
    """Flushes a file's data before it gets its name, if the policy asks for it."""
    if durability == "fsync":
        os.fdatasync(fd)


def flush_directories(paths: Iterable[str], durability: Durability) -> None:
    """Flushes directories whose entries changed (once each), if the policy asks for it."""
    if durability != "fsync":
        return
    for path in set(paths):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
