"""Resumable ByteStream uploads: partial data kept per (upload id, digest) until it is finished."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.cas.disk_store import DiskBlobStore, write_all
from worker.digests import Digest
from worker.errors import InvalidArgument, raise_if_disk_full


@dataclass
class PartialUpload:
    """Bytes received so far for one upload, hashed as they arrive."""

    upload_id: str
    digest: Digest
    file: tempfile._TemporaryFileWrapper[bytes]
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    committed: int = 0
    last_used: float = 0.0


class UploadTracker:
    """Keeps partial uploads so an interrupted Write can resume at QueryWriteStatus's offset.

    Partial uploads are forgotten after `ttl_s` without activity, and on restart.
    """

    def __init__(
        self, store: DiskBlobStore, ttl_s: float = 3600, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._clock = clock
        self._uploads: dict[tuple[str, Digest], PartialUpload] = {}

    def begin(self, upload_id: str, digest: Digest) -> PartialUpload:
        """The partial upload for this id and digest, new or resumed."""
        self._expire()
        key = (upload_id, digest)
        upload = self._uploads.get(key)
        if upload is None:
            upload = PartialUpload(upload_id, digest, self._store.new_temp_file())
            self._uploads[key] = upload
        upload.last_used = self._clock()
        return upload

    def committed_size(self, upload_id: str, digest: Digest) -> int:
        upload = self._uploads.get((upload_id, digest))
        return upload.committed if upload else 0

    def append(self, upload: PartialUpload, offset: int, data: bytes) -> None:
        if offset != upload.committed:
            raise InvalidArgument(
                f"write_offset {offset} does not continue the upload, which holds "
                f"{upload.committed} bytes"
            )
        if upload.committed + len(data) > upload.digest.size:
            self.abandon(upload)
            raise InvalidArgument(
                f"more data than the digest's size {upload.digest.size} for blob {upload.digest}"
            )
        try:
            write_all(upload.file, data)
        except OSError as error:
            self.abandon(upload)  # Free the space; the client must start over.
            raise_if_disk_full(error, f"upload of {upload.digest}")
            raise
        upload.hasher.update(data)
        upload.committed += len(data)
        upload.last_used = self._clock()

    def finish(self, upload: PartialUpload) -> None:
        """Verifies the whole blob against its digest and stores it; the upload ends either way."""
        try:
            actual = Digest(upload.hasher.hexdigest(), upload.committed)
            if actual != upload.digest:
                raise InvalidArgument(
                    f"uploaded data hashes to {actual}, not to the declared digest {upload.digest}"
                )
            self._store.commit(Path(upload.file.name), upload.digest)
        except OSError as error:
            raise_if_disk_full(error, f"upload of {upload.digest}")
            raise
        finally:
            self.abandon(upload)

    def abandon(self, upload: PartialUpload) -> None:
        self._uploads.pop((upload.upload_id, upload.digest), None)
        upload.file.close()

    def close(self) -> None:
        """Drops every partial upload (at shutdown)."""
        for upload in list(self._uploads.values()):
            self.abandon(upload)

    def _expire(self) -> None:
        cutoff = self._clock() - self._ttl_s
        for upload in list(self._uploads.values()):
            if upload.last_used < cutoff:
                self.abandon(upload)
