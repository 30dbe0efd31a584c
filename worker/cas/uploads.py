"""Resumable ByteStream uploads: partial data kept per (upload id, digest) until it is finished.

Every client may be hostile or simply vanish, so a partial upload holds no file descriptor
between chunks (only a path in the CAS's temporary directory and the running hash in memory),
its bytes count against the CAS's `max_bytes`, and there are at most `max_uploads` of them.
Each upload has its own lock: two streams of the same upload (a retry racing its own abandoned
stream) take turns, and neither ever touches a file the other has finished or dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.cas.disk_store import DiskBlobStore, Reservation, pwrite_all
from worker.digests import Digest
from worker.errors import InvalidArgument, ResourceExhausted, raise_if_disk_full

_LATER_CHUNK_FLAGS = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_FIRST_CHUNK_FLAGS = _LATER_CHUNK_FLAGS | os.O_CREAT | os.O_EXCL


class UploadEnded(InvalidArgument):
    """The upload was finished or dropped (by another stream, or expired) while this stream
    still held it. If the blob is now stored, the stream has in effect succeeded."""


@dataclass(eq=False)
class PartialUpload:
    """Bytes received so far for one upload, hashed as they arrive. Fields change only under
    `lock`; once `ended`, nothing touches `path` again."""

    upload_id: str
    digest: Digest
    path: str
    reservation: Reservation
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    committed: int = 0
    last_used: float = 0.0
    ended: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class UploadTracker:
    """Keeps partial uploads so an interrupted Write can resume at QueryWriteStatus's offset.

    Partial uploads are forgotten, and their files deleted, after `ttl_s` without activity,
    and on restart. A new upload beyond `max_uploads` is ResourceExhausted (after expiring
    stale ones); uploads already under way carry on.
    """

    def __init__(
        self,
        store: DiskBlobStore,
        ttl_s: float = 3600,
        clock: Callable[[], float] = time.monotonic,
        max_uploads: int = 256,
    ) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self.clock = clock  # Public so that tests of the whole service can move time.
        self.max_uploads = max_uploads
        self._lock = threading.Lock()
        self._uploads: dict[tuple[str, Digest], PartialUpload] = {}
        self._next_sweep = 0.0
        store.add_reclaimer(self.expire)

    def __len__(self) -> int:
        return len(self._uploads)

    def begin(self, upload_id: str, digest: Digest) -> PartialUpload:
        """The partial upload for this id and digest, new or resumed."""
        self._store.check_fits(digest)
        key = (upload_id, digest)
        with self._lock:
            expired = self._take_expired_locked()
            upload = self._uploads.get(key)
            if upload is None and len(self._uploads) < self.max_uploads:
                upload = PartialUpload(
                    upload_id, digest, self._store.new_temp_path(), self._store.reservation()
                )
                self._uploads[key] = upload
            if upload is not None:
                upload.last_used = self.clock()
        self._discard(expired)
        if upload is None:
            raise ResourceExhausted(
                f"{self.max_uploads} uploads are already in progress; finish them or let them "
                "expire before starting another"
            )
        return upload

    def committed_size(self, upload_id: str, digest: Digest) -> int:
        with self._lock:
            upload = self._uploads.get((upload_id, digest))
        return upload.committed if upload else 0

    def append(self, upload: PartialUpload, offset: int, data: bytes) -> None:
        """Adds data at `offset`, which must be the committed size; the file is opened,
        written and closed again, so an idle upload holds no descriptor."""
        with upload.lock:
            self._check_live(upload)
            if offset != upload.committed:
                if upload.committed == 0:
                    # Nothing to resume: do not let a bad first message hold a slot.
                    self._end_locked(upload)
                raise InvalidArgument(
                    f"write_offset {offset} does not continue the upload, which holds "
                    f"{upload.committed} bytes"
                )
            if upload.committed + len(data) > upload.digest.size:
                self._end_locked(upload)
                raise InvalidArgument(
                    f"more data than the digest's size {upload.digest.size} for blob "
                    f"{upload.digest}"
                )
            if data:
                # The first chunk creates the file; later ones never re-create it, so that
                # a file lost behind our back cannot turn into a blob with a hole in it.
                flags = _FIRST_CHUNK_FLAGS if upload.committed == 0 else _LATER_CHUNK_FLAGS
                try:
                    upload.reservation.grow(len(data))
                    fd = os.open(upload.path, flags, 0o600)
                    try:
                        pwrite_all(fd, data, upload.committed)
                    finally:
                        os.close(fd)
                except FileNotFoundError:
                    self._end_locked(upload)
                    raise UploadEnded(
                        f"the partial data of upload {upload.upload_id} of {upload.digest} "
                        "was lost; start it again"
                    ) from None
                except (OSError, ResourceExhausted) as error:
                    # The CAS or the disk is full: free the space, the client must start over.
                    self._end_locked(upload)
                    if isinstance(error, OSError):
                        raise_if_disk_full(error, f"upload of {upload.digest}")
                    raise
                upload.hasher.update(data)
                upload.committed += len(data)
            upload.last_used = self.clock()

    def finish(self, upload: PartialUpload) -> None:
        """Verifies the whole blob against its digest and stores it; the upload ends either way."""
        with upload.lock:
            self._check_live(upload)
            try:
                actual = Digest(upload.hasher.hexdigest(), upload.committed)
                if actual != upload.digest:
                    raise InvalidArgument(
                        f"uploaded data hashes to {actual}, not to the declared digest "
                        f"{upload.digest}"
                    )
                if not upload.digest.is_empty:
                    if os.stat(upload.path).st_size != upload.committed:
                        raise UploadEnded(
                            f"the partial data of upload {upload.upload_id} of "
                            f"{upload.digest} was damaged; start it again"
                        )
                    self._store.commit(Path(upload.path), upload.digest, upload.reservation)
            except FileNotFoundError:
                raise UploadEnded(
                    f"the partial data of upload {upload.upload_id} of {upload.digest} was "
                    "lost; start it again"
                ) from None
            except OSError as error:
                raise_if_disk_full(error, f"upload of {upload.digest}")
                raise
            finally:
                self._end_locked(upload)

    def abandon(self, upload: PartialUpload) -> None:
        """Drops an upload and deletes its data."""
        with upload.lock:
            if not upload.ended:
                self._end_locked(upload)

    def expire_if_due(self) -> None:
        """expire(), at most once a second: for writes that need no partial upload (a blob
        sent whole), so that stale uploads still go while only such writes come."""
        if self._uploads and self.clock() >= self._next_sweep:
            self.expire()

    def expire(self) -> None:
        """Drops uploads idle for longer than the TTL (and deletes their files)."""
        with self._lock:
            expired = self._take_expired_locked()
        self._discard(expired)

    def close(self) -> None:
        """Drops every partial upload (at shutdown)."""
        with self._lock:
            uploads = list(self._uploads.values())
        for upload in uploads:
            self.abandon(upload)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_live(upload: PartialUpload) -> None:
        if upload.ended:
            raise UploadEnded(
                f"upload {upload.upload_id} of {upload.digest} was finished or dropped by "
                "another stream (or expired); ask QueryWriteStatus where to resume"
            )

    def _end_locked(self, upload: PartialUpload) -> None:
        """Ends an upload whose lock the caller holds: forgets it, deletes its file, gives
        back its space."""
        upload.ended = True
        with self._lock:
            key = (upload.upload_id, upload.digest)
            if self._uploads.get(key) is upload:
                del self._uploads[key]
        self._delete(upload)

    def _take_expired_locked(self) -> list[PartialUpload]:
        """Removes stale uploads from the table (tracker lock held). An upload whose lock is
        taken is being written to right now, so it is not stale; the others are marked ended
        under their own lock, so no stream writes to them once this returns."""
        now = self.clock()
        self._next_sweep = now + 1.0
        cutoff = now - self._ttl_s
        expired = []
        for key, upload in list(self._uploads.items()):
            if upload.last_used >= cutoff or not upload.lock.acquire(blocking=False):
                continue
            try:
                upload.ended = True
                del self._uploads[key]
                expired.append(upload)
            finally:
                upload.lock.release()
        return expired

    def _discard(self, uploads: list[PartialUpload]) -> None:
        for upload in uploads:
            self._delete(upload)

    @staticmethod
    def _delete(upload: PartialUpload) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(upload.path)
        upload.reservation.release()
