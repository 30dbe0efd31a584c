"""The on-disk CAS: one file per blob, written atomically, bounded in size by LRU eviction.

DiskBlobStore keeps the index (sizes in LRU order, which files are known good, executable
copies, reservations) and every change to the files under it. Its collaborators live next to
it: the small blobs still only in the journal and the thread that makes them files
(worker.cas.small_blobs), reservations and counters (worker.cas.accounting), and the plain
file helpers (worker.cas.fileio).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import stat
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from worker.cas.accounting import CasCounters, Reservation
from worker.cas.durability import Durability, flush_data, flush_directories
from worker.cas.fileio import (
    CHUNK,
    NEW_FILE,
    READ,
    pwrite_all,
    read_exactly,
    storage_error,
    unlink_if_present,
    write_all,
)
from worker.cas.integrity import BlobDamaged, Signature, hash_fd, signature_of
from worker.cas.small_blobs import JOURNAL_MAX_BLOB, SmallBlobs
from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    raise_if_disk_full,
)

# Callers import these from here, where they always were.
__all__ = ["CasCounters", "DiskBlobStore", "Reservation", "pwrite_all"]

log = logging.getLogger(__name__)

# Renames of one batch are done under the store's lock in groups of this many, so that a
# big batch does not hold other writers back for long at a time.
_INSTALL_GROUP = 64


def _not_its_digest(hash_: str, size: int, data: bytes) -> InvalidArgument:
    """Why bytes are not the blob of the declared digest `hash_`/`size`."""
    try:
        declared = Digest(hash_, size)
    except InvalidArgument as malformed:
        return malformed
    return InvalidArgument(
        f"data hashes to {Digest.of(data)}, not to the declared digest {declared}"
    )


class DiskBlobStore:
    """Blobs live at `<root>/blobs/<hash[:2]>/<hash>`, read-only (0444).

    Executable inputs are staged from a second, 0555 copy at
    `<root>/executables/<hash>`, made on first use, counted in the size and
    evicted with the blob, since a hard link cannot have a mode of its own.

    A blob becomes visible only by renaming a complete, verified temporary file
    into place, so readers never see a partial or wrong blob, and two writers of
    the same blob race harmlessly (the same bytes win either way). Whether the
    data is flushed to disk first is the durability policy (worker.cas.durability).
    Small blobs are acknowledged once they are in the journal (worker.cas.journal) and
    become files in the background (worker.cas.small_blobs); until then they are indexed and
    served from memory, and anything that needs the file (staging, blob_path) makes it first.

    Nothing trusts a stored file blindly: whole reads hash what they read and a blob
    whose bytes no longer match its digest is removed and reported missing
    (BlobDamaged). For staging, where hashing every input of every action would cost too
    much, the store remembers each blob file's stat signature from when its bytes were last
    known good (written by us, or hashed) and rehashes only a file whose signature changed
    (or is unknown, as every blob is after a restart).

    The bytes of all blobs and executable copies, plus the bytes reserved for
    data on its way in (partial uploads, copies in progress), are kept under
    `max_bytes` by evicting the least recently used blobs. Every change to the
    names under `blobs/` and `executables/` (rename into place, unlink on
    eviction) happens under the same lock as the change to the index, so the
    index never lists a file that is gone. Eviction only unlinks: hard links
    already made into exec roots, and open readers, keep their data.

    All methods block on the disk or on the store's lock: call them from worker threads.
    """

    def __init__(self, root: Path, max_bytes: int, durability: Durability = "none") -> None:
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
        self.durability: Durability = durability
        self._lock = threading.Lock()
        self.counters = CasCounters()
        self._lru: OrderedDict[str, int] = OrderedDict()  # hash -> blob size
        self._exe: dict[str, int] = {}  # hash -> size of its executable copy
        self._good: dict[str, Signature] = {}  # blob files last known to match their hash
        self._good_exe: dict[str, Signature] = {}  # the same for executable copies
        self._total = 0  # blobs plus executable copies
        self._reserved = 0  # data on its way in
        self._reclaimers: list[Callable[[], None]] = []
        self._temp_names = itertools.count()
        # Replays the last run's journal into files, so before the index is read from them.
        self._small = SmallBlobs(self, root / "journal")
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
                unlink_if_present(entry.path)
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

    def __len__(self) -> int:
        return len(self._lru)

    def blob_path(self, digest: Digest) -> Path:
        """Where the blob's file is; a blob still only in the journal is made a file first."""
        if digest.hash in self._small.pending:  # one dict lookup: atomic without the lock
            self._small.make_file(digest.hash)
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

    @property
    def blob_count(self) -> int:
        return len(self._lru)

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        return [d for d, here in zip(digests, self.present(digests), strict=True) if not here]

    def present(self, digests: Sequence[Digest]) -> list[bool]:
        """Whether each digest is stored (counted as a use of those that are)."""
        present: list[bool] = []
        lru = self._lru
        with self._lock:  # Once for all of them: FindMissingBlobs asks about thousands.
            for digest in digests:
                if digest.size == 0:
                    present.append(digest == EMPTY_DIGEST)
                elif lru.get(digest.hash) == digest.size:
                    lru.move_to_end(digest.hash)
                    present.append(True)
                else:
                    present.append(False)
            hits = sum(present)
            self.counters.lookups += len(digests)
            self.counters.lookup_hits += hits
        return present

    def find_missing_or_damaged(self, digests: Iterable[Digest]) -> list[Digest]:
        """Like find_missing, but a blob also counts as missing when its file is gone or its
        bytes no longer match (it is then removed). Files whose stat signature is the one
        they had when last known good are not read again; the others are hashed."""
        wanted = list(digests)
        missing = self.find_missing(wanted)
        absent = set(missing)
        for digest in wanted:
            if digest.is_empty or digest in absent:
                continue
            try:
                self.check_whole(digest)
            except NotFound:
                missing.append(digest)
                absent.add(digest)
        return missing

    def check_whole(self, digest: Digest) -> str:
        """The path of a stored blob whose bytes match its digest, rehashing the file only
        if it changed since it was last known good; NotFound (BlobDamaged if the bytes are
        wrong, and the blob is then removed) otherwise."""
        path = self.require_path(digest)
        try:
            # The common case, a file unchanged since it was last known good, costs one stat
            # (staging asks this of every input file of every action).
            if self._good.get(digest.hash) == signature_of(os.lstat(path)):
                return path
            fd = os.open(path, READ)
        except FileNotFoundError:
            self._forget(digest.hash)
            raise NotFound(f"blob {digest} is not in the CAS") from None
        try:
            self._check_fd(digest, fd, os.fstat(fd), self._good)
        finally:
            os.close(fd)
        return path

    def _check_fd(
        self, digest: Digest, fd: int, info: os.stat_result, good: dict[str, Signature]
    ) -> None:
        """Raises BlobDamaged (after removing the blob) unless the open file holds exactly
        the blob's bytes; remembers its signature when it does."""
        signature = signature_of(info)
        if good.get(digest.hash) == signature:
            return
        if info.st_size != digest.size or hash_fd(fd, info.st_size) != (digest.hash, digest.size):
            self.discard_damaged(digest, info.st_ino)
        with self._lock:
            if digest.hash in self._lru:
                good[digest.hash] = signature

    def read(self, digest: Digest) -> bytes:
        """The blob's bytes, checked against its digest as they are read: NotFound if it is
        not stored, BlobDamaged (and the blob is removed) if its bytes do not match."""
        (result,) = self.read_many([digest])
        if isinstance(result, ServiceError):
            raise result
        return result

    def read_many(self, digests: Sequence[Digest]) -> list[bytes | ServiceError]:
        """read() of each digest, with one pass over the index for all of them (a whole
        BatchReadBlobs is one worker thread call): an error or the bytes per digest."""
        results: list[bytes | ServiceError] = [b""] * len(digests)  # the empty blob's stays
        from_files: list[int] = []
        with self._lock:
            for i, digest in enumerate(digests):
                if digest == EMPTY_DIGEST:
                    continue
                if self._lru.get(digest.hash) != digest.size or digest.is_empty:
                    results[i] = NotFound(f"blob {digest} is not in the CAS")
                    continue
                self._lru.move_to_end(digest.hash)
                entry = self._small.pending.get(digest.hash)
                if entry is not None:
                    results[i] = entry.data  # Hashed on the way in, in memory since.
                else:
                    from_files.append(i)
        good: list[tuple[str, os.stat_result]] = []
        for i in from_files:
            try:
                results[i], info = self._read_file(digests[i])
                good.append((digests[i].hash, info))
            except ServiceError as error:
                results[i] = error
        read = sum(len(r) for r in results if isinstance(r, bytes))
        with self._lock:
            for hash_, info in good:
                if hash_ in self._lru:
                    self._good[hash_] = signature_of(info)
            self.counters.bytes_read += read
        return results

    def _read_file(self, digest: Digest) -> tuple[bytes, os.stat_result]:
        """A blob file's bytes, hashed; BlobDamaged (blob removed) if they do not match."""
        try:
            fd = os.open(self.hash_path(digest.hash), READ)
        except FileNotFoundError:
            self._forget(digest.hash)
            raise NotFound(f"blob {digest} is not in the CAS") from None
        try:
            info = os.fstat(fd)
            data = read_exactly(fd, digest.size) if info.st_size == digest.size else b""
        finally:
            os.close(fd)
        if len(data) != digest.size or hashlib.sha256(data).hexdigest() != digest.hash:
            self.discard_damaged(digest, info.st_ino)
        return data, info

    def open_fd(self, digest: Digest) -> tuple[int, os.stat_result]:
        """An open descriptor of a stored (non-empty) blob's file and its stat; NotFound if
        the blob is not stored, BlobDamaged (blob removed) if the file has the wrong size."""
        path = self.require_path(digest)
        try:
            fd = os.open(path, READ)
        except FileNotFoundError:
            self._forget(digest.hash)
            raise NotFound(f"blob {digest} is not in the CAS") from None
        info = os.fstat(fd)
        if info.st_size != digest.size:
            os.close(fd)
            self.discard_damaged(digest, info.st_ino)
        with self._lock:
            self.counters.bytes_read += digest.size
        return fd, info

    def check_open(self, digest: Digest, fd: int, info: os.stat_result) -> None:
        """For a read of part of a blob, which cannot hash as it goes: BlobDamaged unless the
        open file is known good or hashes right now."""
        self._check_fd(digest, fd, info, self._good)

    def require(self, digest: Digest) -> Path:
        """The path of a stored blob, marked as just used; raises NotFound otherwise."""
        return Path(self.require_path(digest))

    def require_path(self, digest: Digest) -> str:
        """The path of a stored blob's file (made now if the blob is still only in the
        journal), marked as just used; NotFound if it is not stored."""
        if not self.contains(digest):
            raise NotFound(f"blob {digest} is not in the CAS")
        self._small.make_file(digest.hash)
        return self.hash_path(digest.hash)

    def pending_data(self, digest: Digest) -> bytes | None:
        """The bytes of a blob that is still only in the journal (None otherwise)."""
        return self._small.data(digest)

    def flush(self) -> None:
        """Makes every blob still only in the journal a file (tests, shutdown)."""
        self._small.flush()

    def close(self) -> None:
        """Makes every journalled blob a file (so a clean stop leaves no journal behind) and
        stops the background thread, waiting for it: once this returns, nothing of the store
        runs behind the caller's back (who may then remove its directory). If that fails (a
        full disk), the journal keeps them for the next start."""
        self._small.close()

    def require_executable(self, digest: Digest) -> Path:
        """Like check_whole(), for the 0555 copy of the blob, which it makes if needed (and
        counts in the store's size). A copy that changed since it was made is checked, and
        made again from the blob if it is wrong."""
        target = self._exe_path(digest.hash)
        for _attempt in range(2):
            source = self.check_whole(digest)
            with self._lock:
                present = digest.hash in self._exe
            if not present:
                self._make_executable(digest, source, target)
                return Path(target)
            try:
                fd = os.open(target, READ)
            except FileNotFoundError:
                self._drop_executable(digest.hash)
                continue
            try:
                info = os.fstat(fd)
                if self._good_exe.get(digest.hash) == signature_of(info):
                    return Path(target)
                if hash_fd(fd, info.st_size) == (digest.hash, digest.size):
                    with self._lock:
                        self._good_exe[digest.hash] = signature_of(info)
                    return Path(target)
            finally:
                os.close(fd)
            log.warning("executable copy of blob %s was damaged on disk; making it again", digest)
            self._drop_executable(digest.hash)
        raise NotFound(f"blob {digest} is not in the CAS")

    def _make_executable(self, digest: Digest, source: str, target: str) -> None:
        reservation = Reservation(self)
        temp = self.new_temp_path("exe-")
        placed = False
        try:
            reservation.grow(digest.size)
            fd = os.open(temp, NEW_FILE, 0o600)
            hasher = hashlib.sha256()
            try:
                with open(source, "rb") as blob:
                    while chunk := blob.read(CHUNK):
                        hasher.update(chunk)
                        write_all(fd, chunk)
                os.fchmod(fd, 0o555)
                flush_data(fd, self.durability)
                info = os.fstat(fd)
            finally:
                os.close(fd)
            if (hasher.hexdigest(), info.st_size) != (digest.hash, digest.size):
                self.discard_damaged(digest, os.stat(source).st_ino)
            with self._lock:
                self._consume_locked(reservation)
                if digest.hash not in self._lru:
                    raise NotFound(f"blob {digest} was evicted while its executable copy was made")
                if digest.hash not in self._exe:
                    os.replace(temp, target)
                    placed = True
                    self._exe[digest.hash] = digest.size
                    self._good_exe[digest.hash] = signature_of(info)
                    self._total += digest.size
                    evicted = self._evict_locked(keep=digest.hash)
                else:
                    evicted = 0
            if placed:
                flush_directories([self._executables_str], self.durability)
            self._log_evicted(evicted)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the CAS") from None
        except OSError as error:
            raise_if_disk_full(error, f"executable copy of {digest}")
            raise
        finally:
            reservation.release()
            if not placed:
                unlink_if_present(temp)

    # ----------------------------------------------------------------- writes

    def put(self, digest: Digest, data: bytes) -> None:
        """Stores bytes that must hash to `digest`; raises InvalidArgument if they do not."""
        (error,) = self.put_many([(digest.hash, digest.size, data)])
        if error is not None:
            raise error

    def put_many(self, items: Sequence[tuple[str, int, bytes]]) -> list[ServiceError | None]:
        """Stores many small blobs with one pass over the index for the lot (BatchUpdateBlobs
        and ByteStream writes of small blobs): checked, written to temporary files, then
        renamed into place in groups under the lock. Returns an error or None per item;
        a blob that does not hash to its digest is InvalidArgument and nothing else fails
        because of it.

        Each item is a digest as the client declared it (hash, size: not validated
        beforehand) and its bytes. Bytes whose SHA-256 is the declared hash and whose length
        is the declared size prove the digest well formed, so a batch costs one hash per
        blob and no separate validation."""
        results: list[ServiceError | None] = [None] * len(items)
        todo: list[int] = []
        sha256 = hashlib.sha256
        for i, (hash_, size, data) in enumerate(items):
            if len(data) != size or sha256(data).hexdigest() != hash_:
                results[i] = _not_its_digest(hash_, size, data)
            elif size > self.max_bytes:
                results[i] = ResourceExhausted(
                    f"blob {hash_}/{size} is larger than the whole CAS ({self.max_bytes} bytes)"
                )
            elif size:
                todo.append(i)
        if not todo:
            return results
        new: list[int] = []
        first: dict[str, int] = {}  # hash -> the item that stores it
        repeats: list[tuple[int, int]] = []  # (item, the earlier item of the same blob)
        with self._lock:
            lru = self._lru
            for i in todo:
                hash_, size, _ = items[i]
                if lru.get(hash_) == size:
                    lru.move_to_end(hash_)
                elif hash_ in first:
                    repeats.append((i, first[hash_]))
                else:
                    first[hash_] = i
                    new.append(i)
        if new:
            self._store_new(items, new, results)
        for i, earlier in repeats:  # a blob sent twice fares the same both times
            results[i] = results[earlier]
        return results

    def _store_new(
        self,
        items: Sequence[tuple[str, int, bytes]],
        new: list[int],
        results: list[ServiceError | None],
    ) -> None:
        """Stores the checked, distinct, not yet stored items `new` of a put_many, setting
        their entries of `results` for those that fail."""
        reservation = Reservation(self)
        try:
            reservation.grow(sum(items[i][1] for i in new))
        except ResourceExhausted as error:
            for i in new:
                results[i] = error
            return
        journalled = self._journal_small(items, new, reservation)
        written: list[tuple[int, str, os.stat_result]] = []
        try:
            for i in new:
                if i in journalled:
                    continue
                hash_, size, data = items[i]
                digest = Digest(hash_, size)
                temp = self._numbered_temp_path("put-")
                try:
                    fd = os.open(temp, NEW_FILE, 0o444)
                    try:
                        write_all(fd, data)
                        flush_data(fd, self.durability)
                        info = os.fstat(fd)
                    finally:
                        os.close(fd)
                except OSError as error:
                    unlink_if_present(temp)
                    results[i] = storage_error(error, f"blob {digest}")
                    continue
                written.append((i, temp, info))
            placed = self._install_many(
                [(Digest(items[i][0], items[i][1]), temp, info) for i, temp, info in written],
                reservation,
            )
            flush_directories((os.path.dirname(path) for path in placed), self.durability)
            written = []
        except OSError as error:
            failure = storage_error(error, f"{len(written)} blobs")
            for i, _, _ in written:
                results[i] = failure
        finally:
            reservation.release()
            for _, temp, _ in written:
                unlink_if_present(temp)

    def _journal_small(
        self, items: Sequence[tuple[str, int, bytes]], new: list[int], reservation: Reservation
    ) -> set[int]:
        """Stores the small ones of `new` through the journal: one append for all of them,
        then they are indexed (and served from memory) until the background thread has
        made them files. Returns which items it took; the others go to files directly."""
        small = [i for i in new if items[i][1] <= JOURNAL_MAX_BLOB]
        if not small:
            return set()
        records = [(items[i][0], items[i][2]) for i in small]
        segment = self._small.append(records)
        if segment is None:
            return set()
        added: list[tuple[str, bytes]] = []
        added_bytes = 0
        with self._lock:
            self._consume_locked(reservation)
            lru = self._lru
            for hash_, data in records:
                stored = lru.get(hash_)
                if stored == len(data):  # stored by another writer meanwhile
                    lru.move_to_end(hash_)
                    continue
                lru[hash_] = len(data)  # a new key goes last, as most recently used
                if stored is not None:  # a file of another size (torn): replaced when made
                    lru.move_to_end(hash_)
                    self._total -= stored
                    self._good.pop(hash_, None)
                added.append((hash_, data))
                added_bytes += len(data)
            self._small.add_many_locked(added, segment)
            self._total += added_bytes
            self.counters.bytes_stored += added_bytes
            evicted = self._evict_locked(keep=added[-1][0]) if added else 0
            if added:
                self._small.wake_locked()
        if len(added) < len(records):
            self._small.journal.done(segment, len(records) - len(added))
        self._log_evicted(evicted)
        return set(small)

    def new_temp_path(self, prefix: str = "upload-") -> str:
        """A fresh name for a file on the CAS's filesystem (not created; the directory is
        emptied at startup). Its owner deletes it."""
        return f"{self._tmp}/{prefix}{uuid.uuid4().hex}"

    def _numbered_temp_path(self, prefix: str) -> str:
        """Like new_temp_path, cheaper: a name unique to this run of the store."""
        return f"{self._tmp}/{prefix}{next(self._temp_names)}"

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
            if self.durability != "none":
                fd = os.open(temp_path, READ)
                try:
                    flush_data(fd, self.durability)
                finally:
                    os.close(fd)
            os.link(temp_path, staged)
            self._install(staged, digest, own, os.stat(staged))
        except OSError as error:
            unlink_if_present(staged)
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
                while chunk := os.pread(fd, CHUNK if limit < 0 else min(CHUNK, limit - size), size):
                    reservation.grow(len(chunk))
                    hasher.update(chunk)
                    write_all(out, chunk)
                    size += len(chunk)
                flush_data(out, self.durability)
                info = os.fstat(out)
            finally:
                os.close(out)
            digest = Digest(hasher.hexdigest(), size)
            if digest.is_empty or self.contains(digest):
                return digest
            self.check_fits(digest)
            os.chmod(temp, 0o444)
            self._install(temp, digest, reservation, info)
            placed = True
            return digest
        except OSError as error:
            raise_if_disk_full(error, what)
            raise
        finally:
            reservation.release()
            if not placed:
                unlink_if_present(temp)

    # ----------------------------------------------------------- damage

    def discard_damaged(self, digest: Digest, inode: int) -> NoReturn:
        """Removes a blob found damaged (the file with this inode) and raises BlobDamaged.
        A good copy stored in its place since (another inode) is left alone."""
        path = self.hash_path(digest.hash)
        with self._lock:
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == inode:
                if digest.hash in self._lru:
                    self._drop_locked(digest.hash)
                else:
                    unlink_if_present(path)
            elif current is None and digest.hash in self._lru:
                self._drop_locked(digest.hash)
        log.warning("blob %s was damaged on disk (its bytes no longer match); removed", digest)
        raise BlobDamaged(
            f"blob {digest} was damaged on disk (its bytes no longer match its digest) and "
            "has been removed; upload it again"
        )

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
            return os.open(path, NEW_FILE, mode), path
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

    def mark_good(self, hash_: str, info: os.stat_result) -> None:
        """Records that the blob file `info` describes was just found to hold its bytes."""
        with self._lock:
            if hash_ in self._lru:
                self._good[hash_] = signature_of(info)

    def _install(
        self, staged: str, digest: Digest, reservation: Reservation, info: os.stat_result
    ) -> None:
        """Renames a complete, verified 0444 file into place and indexes it, in one step under
        the lock; the reservation becomes the blob's size. `staged` is gone afterwards unless
        this raised."""
        placed = self._install_many([(digest, staged, info)], reservation)
        flush_directories((os.path.dirname(path) for path in placed), self.durability)

    def _install_many(
        self, staged: list[tuple[Digest, str, os.stat_result]], reservation: Reservation
    ) -> list[str]:
        """Renames complete, verified 0444 files into place and indexes them, each in one step
        under the lock (a few dozen per hold); the reservation pays for them. A blob already
        stored whole is left as it is (its staged file is deleted); one indexed with another
        size (a file torn by a crash) is replaced. Returns the paths that were placed. If
        this raises, the staged files not yet placed are the caller's to delete."""
        placed: list[str] = []
        leftover: list[str] = []
        evicted = 0
        consumed = False
        for start in range(0, len(staged), _INSTALL_GROUP):
            with self._lock:
                if not consumed:
                    self._consume_locked(reservation)
                    consumed = True
                for digest, path, info in staged[start : start + _INSTALL_GROUP]:
                    size = self._lru.get(digest.hash)
                    if size == digest.size:
                        self._lru.move_to_end(digest.hash)
                        leftover.append(path)
                        continue
                    target = self.hash_path(digest.hash)
                    os.replace(path, target)
                    placed.append(target)
                    if size is not None:
                        self._total -= size
                        self._good.pop(digest.hash, None)
                    self._lru[digest.hash] = digest.size
                    self._lru.move_to_end(digest.hash)
                    self._good[digest.hash] = signature_of(info)
                    self._total += digest.size
                    self.counters.bytes_stored += digest.size
                    keep = digest.hash
                evicted += self._evict_locked(keep=keep) if placed else 0
        for path in leftover:
            unlink_if_present(path)
        self._log_evicted(evicted)
        return placed

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
        self._good.pop(hash_, None)
        self._small.drop_locked(hash_)
        unlink_if_present(self.hash_path(hash_))
        self._drop_executable_locked(hash_)

    def _drop_executable_locked(self, hash_: str) -> None:
        exe_size = self._exe.pop(hash_, None)
        self._good_exe.pop(hash_, None)
        if exe_size is not None:
            self._total -= exe_size
            unlink_if_present(self._exe_path(hash_))

    def _drop_executable(self, hash_: str) -> None:
        with self._lock:
            self._drop_executable_locked(hash_)

    def _log_evicted(self, evicted: int) -> None:
        if evicted:
            log.info("evicted %d blobs to stay under %d bytes", evicted, self.max_bytes)

    def _forget(self, hash_: str) -> None:
        """Drops a blob whose file disappeared behind our back from the index."""
        with self._lock:
            if hash_ in self._lru and not os.path.exists(self.hash_path(hash_)):
                self._drop_locked(hash_)
