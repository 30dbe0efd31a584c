"""The on-disk CAS: one file per blob, written atomically, bounded in size by LRU eviction."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import InvalidArgument, NotFound, ResourceExhausted, raise_if_disk_full

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def write_all(file: BinaryIO | tempfile._TemporaryFileWrapper[bytes], data: bytes) -> None:
    """Writes all of data to an unbuffered file, which may accept less per call."""
    view = memoryview(data)
    while view:
        written = file.write(view)
        view = view[written or 0 :]


class DiskBlobStore:
    """Blobs live at `<root>/blobs/<hash[:2]>/<hash>`, read-only (0444).

    Executable inputs are staged from a second, 0555 copy at
    `<root>/executables/<hash>`, made on first use and evicted with the blob,
    since a hard link cannot have a mode of its own.

    A blob becomes visible only by renaming a complete, verified temporary file
    into place, so readers never see a partial or wrong blob, and two writers of
    the same blob race harmlessly (the same bytes win either way). The size of
    all blobs is kept under `max_bytes` by evicting the least recently used.
    Eviction only unlinks: hard links already made into exec roots, and open
    readers, keep their data.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self._blobs = root / "blobs"
        self._blobs_str = str(self._blobs)
        self._executables = root / "executables"
        self._executables.mkdir(parents=True, exist_ok=True)
        self._tmp = root / "tmp"
        for shard in range(256):
            (self._blobs / f"{shard:02x}").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._load_index()

    def _load_index(self) -> None:
        found: list[tuple[float, str, int]] = []
        for shard in self._blobs.iterdir():
            for entry in os.scandir(shard):
                stat = entry.stat()
                found.append((stat.st_mtime, entry.name, stat.st_size))
        for _, name, size in sorted(found):
            self._lru[name] = size
            self._total += size
        log.info("CAS holds %d blobs, %d bytes", len(self._lru), self._total)

    @property
    def total_bytes(self) -> int:
        return self._total

    def blob_path(self, digest: Digest) -> Path:
        return Path(self.hash_path(digest.hash))

    def hash_path(self, hash_: str) -> str:
        """Where a blob with this (already validated) hash is stored, as a plain string:
        staging builds thousands of these per action, and pathlib is slow at it."""
        return f"{self._blobs_str}/{hash_[:2]}/{hash_}"

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
        return [d for d in digests if not self.contains(d)]

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
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            self._forget(digest.hash)
            raise NotFound(f"blob {digest} is not in the CAS") from None

    def require(self, digest: Digest) -> Path:
        """The path of a stored blob, marked as just used; raises NotFound otherwise."""
        if not self.contains(digest):
            raise NotFound(f"blob {digest} is not in the CAS")
        return self.blob_path(digest)

    def require_executable(self, digest: Digest) -> Path:
        """Like require(), for the 0555 copy of the blob, which it makes if needed."""
        source = self.require(digest)
        target = self._executables / digest.hash
        if target.exists():
            return target
        with self.new_temp_file() as temp:
            try:
                with open(source, "rb") as blob:
                    while chunk := blob.read(_CHUNK):
                        write_all(temp, chunk)
            except OSError as error:
                raise_if_disk_full(error, f"executable copy of {digest}")
                raise
            os.chmod(temp.name, 0o555)
            staged = Path(temp.name + ".link")
            os.link(temp.name, staged)
            os.replace(staged, target)
        return target

    # ----------------------------------------------------------------- writes

    def put(self, digest: Digest, data: bytes) -> None:
        """Stores bytes that must hash to `digest`; raises InvalidArgument if they do not."""
        actual = Digest.of(data)
        if actual != digest:
            raise InvalidArgument(f"data hashes to {actual}, not to the declared digest {digest}")
        if digest.is_empty or self.contains(digest):
            return
        self._check_fits(digest)
        # Plain os calls: batches of small blobs made NamedTemporaryFile the main cost.
        temp = f"{self._tmp}/put-{uuid.uuid4().hex}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(temp, self.hash_path(digest.hash))
        except OSError as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise_if_disk_full(error, f"blob {digest}")
            raise
        self._remember(digest)

    def new_temp_file(self) -> tempfile._TemporaryFileWrapper[bytes]:
        """A temporary file on the CAS's filesystem, deleted on close unless committed."""
        # Unbuffered: a full disk fails in write_all(), never again at close.
        return tempfile.NamedTemporaryFile(dir=self._tmp, prefix="blob-", buffering=0)

    def commit(self, temp_path: Path, digest: Digest) -> None:
        """Moves an already verified temporary file into place as `digest` (hard link, so
        the caller's handle stays valid and its deletion on close is harmless)."""
        if digest.is_empty or self.contains(digest):
            return
        self._check_fits(digest)
        target = self.blob_path(digest)
        os.chmod(temp_path, 0o444)
        staged = temp_path.with_name(temp_path.name + ".link")
        try:
            os.link(temp_path, staged)
            os.replace(staged, target)
        except OSError as error:
            staged.unlink(missing_ok=True)
            raise_if_disk_full(error, f"blob {digest}")
            raise
        self._remember(digest)

    def ingest_file(self, path: Path) -> Digest:
        """Copies a file (an action's output) into the CAS and returns its digest.

        It is copied, never linked: the action's user owns the source inode and
        could change it later through another hard link.
        """
        hasher = hashlib.sha256()
        size = 0
        with open(path, "rb") as source, self.new_temp_file() as temp:
            try:
                while chunk := source.read(_CHUNK):
                    hasher.update(chunk)
                    size += len(chunk)
                    write_all(temp, chunk)
            except OSError as error:
                raise_if_disk_full(error, f"output {path}")
                raise
            digest = Digest(hasher.hexdigest(), size)
            self.commit(Path(temp.name), digest)
        return digest

    # ---------------------------------------------------------- bookkeeping

    def _check_fits(self, digest: Digest) -> None:
        if digest.size > self.max_bytes:
            raise ResourceExhausted(
                f"blob {digest} is larger than the whole CAS ({self.max_bytes} bytes)"
            )

    def _remember(self, digest: Digest) -> None:
        evicted: list[str] = []
        with self._lock:
            if digest.hash not in self._lru:
                self._lru[digest.hash] = digest.size
                self._total += digest.size
            while self._total > self.max_bytes and len(self._lru) > 1:
                oldest, size = next(iter(self._lru.items()))
                if oldest == digest.hash:
                    break
                del self._lru[oldest]
                self._total -= size
                evicted.append(oldest)
        for name in evicted:
            (self._blobs / name[:2] / name).unlink(missing_ok=True)
            (self._executables / name).unlink(missing_ok=True)
        if evicted:
            log.info("evicted %d blobs to stay under %d bytes", len(evicted), self.max_bytes)

    def _forget(self, hash_: str) -> None:
        with self._lock:
            size = self._lru.pop(hash_, None)
            if size is not None:
                self._total -= size
