"""The action cache on disk: one serialized ActionResult per action digest."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from worker.cas.disk_store import DiskBlobStore
from worker.cas.durability import flush_data, flush_directories
from worker.digests import Digest
from worker.errors import NotFound, raise_if_disk_full
from worker.reapi import re_pb2


def referenced_blobs(result: re_pb2.ActionResult, store: DiskBlobStore) -> list[Digest]:
    """Every blob a client may fetch because of this result, Tree contents included.

    Raises NotFound when a Tree itself is missing, since its contents cannot be known.
    """
    digests = [Digest.from_proto(f.digest) for f in result.output_files]
    digests.extend(
        Digest.from_proto(getattr(result, name))
        for name in ("stdout_digest", "stderr_digest")
        if result.HasField(name)
    )
    for directory in result.output_directories:
        tree_digest = Digest.from_proto(directory.tree_digest)
        digests.append(tree_digest)
        tree = re_pb2.Tree.FromString(store.read(tree_digest))
        for level in [tree.root, *tree.children]:
            digests.extend(Digest.from_proto(f.digest) for f in level.files)
    return digests


class DiskActionCache:
    """Entries live at `<root>/<hash>_<size>`; writes are atomic (temp file + rename).

    A lookup is a hit only if every blob the result refers to is still in the
    CAS and whole (its file unchanged since it was last known good, or hashing right):
    after eviction or damage the entry reads as a miss, so clients re-run the action
    instead of failing to download its outputs. Under the `fsync` durability policy an
    entry is flushed to disk like a blob, after the blobs it names were (they are stored
    first), so not even a host crash leaves an entry whose blobs were lost.
    """

    def __init__(self, root: Path, store: DiskBlobStore) -> None:
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self._store = store

    def _path(self, action_digest: Digest) -> Path:
        return self._root / f"{action_digest.hash}_{action_digest.size}"

    def get(self, action_digest: Digest) -> re_pb2.ActionResult:
        try:
            result = re_pb2.ActionResult.FromString(self._path(action_digest).read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no cached result for action {action_digest}") from None
        try:
            missing = self._store.find_missing_or_damaged(referenced_blobs(result, self._store))
        except NotFound:
            missing = [action_digest]
        if missing:
            raise NotFound(
                f"cached result for action {action_digest} refers to evicted or damaged blobs; "
                "treat as a miss"
            )
        return result

    def put(self, action_digest: Digest, result: re_pb2.ActionResult) -> None:
        data = result.SerializeToString(deterministic=True)
        fd, temp = tempfile.mkstemp(dir=self._root, prefix=".entry-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                flush_data(out.fileno(), self._store.durability)
            os.replace(temp, self._path(action_digest))
            flush_directories([str(self._root)], self._store.durability)
        except OSError as error:
            Path(temp).unlink(missing_ok=True)
            raise_if_disk_full(error, f"the result of action {action_digest}")
            raise
