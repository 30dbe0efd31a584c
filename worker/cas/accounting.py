"""Space and counts of a DiskBlobStore: reservations of room for data on its way in, and the
totals the metrics read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.cas.disk_store import DiskBlobStore


class Reservation:
    """Bytes set aside in a store's `max_bytes` for data on its way in (a partial upload, a
    blob being copied), so that stored blobs plus data in flight never exceed the bound.

    Owned by one writer at a time. Installing the blob turns the reservation into the blob's
    size; release() gives back whatever is left (a no-op once installed or released).
    """

    def __init__(self, store: DiskBlobStore) -> None:
        self._store = store
        self.bytes = 0

    def grow(self, n: int) -> None:
        """Sets aside n more bytes, evicting blobs if needed; ResourceExhausted if they cannot
        fit even with every blob evicted."""
        if n > 0:
            self._store._reserve(n)
            self.bytes += n

    def release(self) -> None:
        n, self.bytes = self.bytes, 0
        if n:
            self._store._release(n)


@dataclass
class CasCounters:
    """Totals since the store opened, for the metrics: changed under the store's lock (so no
    increment is lost between threads), read without it."""

    lookups: int = 0  # digests asked about by FindMissingBlobs
    lookup_hits: int = 0  # of those, stored
    evictions: int = 0  # blobs evicted to stay under max_bytes
    bytes_stored: int = 0  # bytes of new blobs written in
    bytes_read: int = 0  # bytes of blobs read (clients' reads, action loads)
