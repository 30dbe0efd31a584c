"""The on-disk CAS: one file per blob, written atomically, bounded in size by LRU eviction."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import InvalidArgument, NotFound, ResourceExhausted, raise_if_disk_full

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def write_all(file: BinaryIO | tempfile._TemporaryFileWrapper[bytes], data: bytes) -> None:
    """Writes all of data to an unbuffered file, which may accept less per call."""
    view = memoryview(data)
    while view:
        written = file.write(view)
        view = view[written or 0 :]


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Writes all of data at `offset` of an open file, which may accept less per call."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
    """Totals since the store opened, for the metrics (plain counts, read without the lock)."""

    lookups: int = 0  # digests asked about by FindMissingBlobs
    lookup_hits: int = 0  # of those, stored
    evictions: int = 0  # blobs evicted to stay under max_bytes
    bytes_stored: int = 0  # bytes of new blobs written in
    bytes_read: int = 0  # bytes of blobs opened for reading (clients' reads, action loads)


class DiskBlobStore:
    """Blobs live at `<root>/blobs/<hash[:2]>/<hash>`, read-only (0444).

    Executable inputs are staged from a second, 0555 copy at
    `<root>/executables/<hash>`, made on first use, counted in the size and
    evicted with the blob, since a hard link cannot have a mode of its own.

    A blob becomes visible only by renaming a complete, verified temporary file
    into place, so readers never see a partial or wrong blob, and two writers of
    the same blob race harmlessly (the same bytes win either way).

    The bytes of all blobs and executable copies, plus the bytes reserved for
    data on its way in (partial uploads, copies in progress), are kept under
    `max_bytes` by evicting the least recently used blobs. Every change to the
    names under `blobs/` and `executables/` (rename into place, unlink on
    eviction) happens under the same lock as the change to the index, so the
    index never lists a file that is gone. Eviction only unlinks: hard links
    already made into exec roots, and open readers, keep their data.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self._blobs = root / "blobs"
        self._blobs_str = str(self._blobs)
        self._executables = root / "executables"
        self._executables_str = str(self._executables)
        self._executables.mkdir(parents=True, exist_ok=True)
        self._tmp = root / "tmp"
        for shard in range(256):
            (self._blobs / f"{shard:02x}").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # hash -> blob size
        self._exe: dict[str, int] = {}  # hash -> size of its executable copy
        self._total = 0  # blobs plus executable copies
        self._reserved = 0  # data on its way in
        self._reclaimers: list[Callable[[], None]] = []
        self.counters = CasCounters()
        self._load_index()

    def _load_index(self) -> None:
        found: list[tuple[float, str, int]] = []
        for shard in self._blobs.iterdir():
            for entry in os.scandir(shard):
                info = entry.stat(follow_symlinks=False)
                found.append((info.st_mtime, entry.name, info.st_size))
        for _, name, size in sorted(found):
            self._lru[name] = size
            self._total += size
        for entry in os.scandir(self._executables):
            size = entry.stat(follow_symlinks=False).st_size
            if self._lru.get(entry.name) == size:
                self._exe[entry.name] = size
                self._total += size
            else:  # Left over from a crash between evicting a blob and its copy.
                _unlink(entry.path)
        with self._lock:
            evicted = self._evict_locked(keep=None)
        log.info(
            "CAS holds %d blobs, %d executable copies, %d bytes (%d evicted to fit %d)",
            len(self._lru),
            len(self._exe),
            self._total,
            evicted,
            self.max_bytes,
        )

    @property
    def total_bytes(self) -> int:
        """Bytes of stored blobs and their executable copies."""
        return self._total

    @property
    def reserved_bytes(self) -> int:
        """Bytes set aside for data on its way in (partial uploads, copies in progress)."""
        return self._reserved

    def blob_path(self, digest: Digest) -> Path:
        return Path(self.hash_path(digest.hash))

    def hash_path(self, hash_: str) -> str:
        """Where a blob with this (already validated) hash is stored, as a plain string:
        staging builds thousands of these per action, and pathlib is slow at it."""
        return f"{self._blobs_str}/{hash_[:2]}/{hash_}"

    def _exe_path(self, hash_: str) -> str:
        return f"{self._executables_str}/{hash_}"

    # ---------------------------------------------------------------- queries

    def contains(self, digest: Digest) -> bool:
        if digest.is_empty:
            return digest == EMPTY_DIGEST
        with self._lock:
            size = self._lru.get(digest.hash)
            if size != digest.size:
                return False
            self._lru.move_to_end(digest.hash)
            return True

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        asked = list(digests)
        missing = [d for d in asked if not self.contains(d)]
        self.counters.lookups += len(asked)
        self.counters.lookup_hits += len(asked) - len(missing)
        return missing

    @property
    def blob_count(self) -> int:
        return len(self._lru)

    def read(self, digest: Digest) -> bytes:
        if digest.is_empty:
            return b""
        with self.open(digest) as stream:
            return stream.read()

    def open(self, digest: Digest) -> BinaryIO:
        """Opens a blob for reading; raises NotFound if it is not stored."""
        if digest.is_empty:
            return open(os.devnull, "rb")
        self.require(digest)
        try:
            stream = open(self.blob_path(digest), "rb")
            self.counters.bytes_read += digest.size
            return stream
        except FileNotFoundError:  # Evicted since require(), or removed behind our back.
            self._forget(digest.hash)
            raise NotFound(f"blob {digest} is not in the CAS") from None

    def require(self, digest: Digest) -> Path:
        """The path of a stored blob, marked as just used; raises NotFound otherwise."""
        if not self.contains(digest):
            raise NotFound(f"blob {digest} is not in the CAS")
        return self.blob_path(digest)

    def require_executable(self, digest: Digest) -> Path:
        """Like require(), for the 0555 copy of the blob, which it makes if needed (and counts
        in the store's size)."""
        source = self.require(digest)
        target = self._exe_path(digest.hash)
        with self._lock:
            if digest.hash in self._exe:
                return Path(target)
        reservation = Reservation(self)
        temp = self.new_temp_path("exe-")
        placed = False
        try:
            reservation.grow(digest.size)
            fd = os.open(temp, _NEW_FILE, 0o600)
            try:
                with open(source, "rb") as blob:
                    while chunk := blob.read(_CHUNK):
                        _write_fd(fd, chunk)
                os.fchmod(fd, 0o555)
            finally:
                os.close(fd)
            with self._lock:
                self._consume_locked(reservation)
                if digest.hash not in self._lru:
                    raise NotFound(f"blob {digest} was evicted while its executable copy was made")
                if digest.hash not in self._exe:
                    os.replace(temp, target)
                    placed = True
                    self._exe[digest.hash] = digest.size
                    self._total += digest.size
                    evicted = self._evict_locked(keep=digest.hash)
                else:
                    evicted = 0
            self._log_evicted(evicted)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the CAS") from None
        except OSError as error:
            raise_if_disk_full(error, f"executable copy of {digest}")
            raise
        finally:
            reservation.release()
            if not placed:
                _unlink(temp)
        return Path(target)

    # ----------------------------------------------------------------- writes

    def put(self, digest: Digest, data: bytes) -> None:
        """Stores bytes that must hash to `digest`; raises InvalidArgument if they do not."""
        actual = Digest.of(data)
        if actual != digest:
            raise InvalidArgument(f"data hashes to {actual}, not to the declared digest {digest}")
        if digest.is_empty or self.contains(digest):
            return
        self.check_fits(digest)
        reservation = Reservation(self)
        reservation.grow(digest.size)
        # Plain os calls: batches of small blobs made NamedTemporaryFile the main cost.
        temp = f"{self._tmp}/put-{uuid.uuid4().hex}"
        try:
            fd = os.open(temp, _NEW_FILE, 0o444)
            try:
                _write_fd(fd, data)
            finally:
                os.close(fd)
            self._install(temp, digest, reservation)
        except OSError as error:
            _unlink(temp)
            raise_if_disk_full(error, f"blob {digest}")
            raise
        finally:
            reservation.release()

    def new_temp_file(self) -> tempfile._TemporaryFileWrapper[bytes]:
        """A temporary file on the CAS's filesystem, deleted on close unless committed."""
        # Unbuffered: a full disk fails in write_all(), never again at close.
        return tempfile.NamedTemporaryFile(dir=self._tmp, prefix="blob-", buffering=0)

    def new_temp_path(self, prefix: str = "upload-") -> str:
        """A fresh name for a file on the CAS's filesystem (not created; the directory is
        emptied at startup). Its owner deletes it."""
        return f"{self._tmp}/{prefix}{uuid.uuid4().hex}"

    def reservation(self) -> Reservation:
        """An empty reservation of space in this store, for data on its way in."""
        return Reservation(self)

    def add_reclaimer(self, reclaim: Callable[[], None]) -> None:
        """Registers a callback that frees reserved space (expires stale partial uploads); it
        runs, without the store's lock, before a reservation is refused."""
        self._reclaimers.append(reclaim)

    def commit(
        self, temp_path: Path, digest: Digest, reservation: Reservation | None = None
    ) -> None:
        """Moves an already verified temporary file into place as `digest` (hard link, so
        the caller's handle stays valid and its deletion on close is harmless).

        The space comes out of `reservation` if given (topped up to the digest's size), which
        is used up or released whatever happens."""
        own = reservation if reservation is not None else Reservation(self)
        staged = f"{temp_path}.link"
        try:
            if digest.is_empty or self.contains(digest):
                return
            self.check_fits(digest)
            own.grow(digest.size - own.bytes)
            os.chmod(temp_path, 0o444)
            os.link(temp_path, staged)
            self._install(staged, digest, own)
        except OSError as error:
            _unlink(staged)
            raise_if_disk_full(error, f"blob {digest}")
            raise
        finally:
            own.release()

    def ingest_file(self, path: Path) -> Digest:
        """Copies a file (an action's output) into the CAS and returns its digest.

        It is copied, never linked: the action's user owns the source inode and
        could change it later through another hard link.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.ingest_fd(fd, f"output {path}")
        finally:
            os.close(fd)

    def ingest_fd(self, fd: int, what: str, max_bytes: int | None = None) -> Digest:
        """Copies an open regular file, from offset 0 to its end (or its first `max_bytes`,
        for a file someone may still be appending to), into the CAS and returns its digest.
        The fd is read with pread (its offset is left alone) and not closed; `what` names the
        file in errors."""
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{what} is not a regular file")
        hasher = hashlib.sha256()
        size = 0
        reservation = Reservation(self)
        out, temp = self._new_temp("ingest-", 0o600)
        placed = False
        try:
            try:
                limit = max_bytes if max_bytes is not None else -1
                while chunk := os.pread(
                    fd, _CHUNK if limit < 0 else min(_CHUNK, limit - size), size
                ):
                    reservation.grow(len(chunk))
                    hasher.update(chunk)
                    _write_fd(out, chunk)
                    size += len(chunk)
            finally:
                os.close(out)
            digest = Digest(hasher.hexdigest(), size)
            if digest.is_empty or self.contains(digest):
                return digest
            self.check_fits(digest)
            os.chmod(temp, 0o444)
            self._install(temp, digest, reservation)
            placed = True
            return digest
        except OSError as error:
            raise_if_disk_full(error, what)
            raise
        finally:
            reservation.release()
            if not placed:
                _unlink(temp)

    # ---------------------------------------------------------- bookkeeping

    def check_fits(self, digest: Digest) -> None:
        """ResourceExhausted if the blob could never fit, whatever is evicted."""
        if digest.size > self.max_bytes:
            raise ResourceExhausted(
                f"blob {digest} is larger than the whole CAS ({self.max_bytes} bytes)"
            )

    def _new_temp(self, prefix: str, mode: int) -> tuple[int, str]:
        path = self.new_temp_path(prefix)
        try:
            return os.open(path, _NEW_FILE, mode), path
        except OSError as error:
            raise_if_disk_full(error, "a temporary file")
            raise

    def _reserve(self, n: int) -> None:
        for attempt in range(2):
            with self._lock:
                # Evicting every blob frees `total`; only reservations cannot be evicted.
                if self._reserved + n <= self.max_bytes:
                    self._reserved += n
                    evicted = self._evict_locked(keep=None)
                    break
            if attempt == 0:
                for reclaim in self._reclaimers:
                    reclaim()
        else:
            raise ResourceExhausted(
                f"the CAS is full: {self._reserved} of its {self.max_bytes} bytes are held by "
                f"uploads and copies in progress, no room for {n} more"
            )
        self._log_evicted(evicted)

    def _release(self, n: int) -> None:
        with self._lock:
            self._reserved -= n

    def _consume_locked(self, reservation: Reservation) -> None:
        """Hands the reserved bytes over to what is being installed (lock held)."""
        self._reserved -= reservation.bytes
        reservation.bytes = 0

    def _install(self, staged: str, digest: Digest, reservation: Reservation) -> None:
        """Renames a complete, verified 0444 file into place and indexes it, in one step under
        the lock; the reservation becomes the blob's size. `staged` is gone afterwards unless
        this raised."""
        with self._lock:
            self._consume_locked(reservation)
            if digest.hash in self._lru:
                self._lru.move_to_end(digest.hash)
                present = True
            else:
                os.replace(staged, self.hash_path(digest.hash))
                present = False
                self._lru[digest.hash] = digest.size
                self._total += digest.size
                self.counters.bytes_stored += digest.size
                evicted = self._evict_locked(keep=digest.hash)
        if present:
            _unlink(staged)
        else:
            self._log_evicted(evicted)

    def _evict_locked(self, keep: str | None) -> int:
        """Evicts least recently used blobs (never `keep`) until blobs plus reservations fit
        in max_bytes; unlinks them while the lock is held so that nothing can re-add them
        between the index and the disk. Returns how many were evicted."""
        evicted = 0
        while self._total + self._reserved > self.max_bytes and self._lru:
            oldest = next(iter(self._lru))
            if oldest == keep:
                if len(self._lru) == 1:
                    break
                self._lru.move_to_end(oldest)
                continue
            self._drop_locked(oldest)
            evicted += 1
        self.counters.evictions += evicted
        return evicted

    def _drop_locked(self, hash_: str) -> None:
        self._total -= self._lru.pop(hash_)
        _unlink(self.hash_path(hash_))
        exe_size = self._exe.pop(hash_, None)
        if exe_size is not None:
            self._total -= exe_size
            _unlink(self._exe_path(hash_))

    def _log_evicted(self, evicted: int) -> None:
        if evicted:
            log.info("evicted %d blobs to stay under %d bytes", evicted, self.max_bytes)

    def _forget(self, hash_: str) -> None:
        """Drops a blob whose file disappeared behind our back from the index."""
        with self._lock:
            if hash_ in self._lru and not os.path.exists(self.hash_path(hash_)):
                self._drop_locked(hash_)
