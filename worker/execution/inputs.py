"""Stages an action's input root from the local CAS: hard links, no copies, nothing writable."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import FailedPrecondition, InvalidArgument, NotFound
from worker.reapi import re_pb2


class DirectoryCache:
    """Parsed Directory messages by digest; input trees repeat across actions."""

    def __init__(self, store: DiskBlobStore, max_entries: int = 50_000) -> None:
        self._store = store
        self._max = max_entries
        self._entries: OrderedDict[Digest, re_pb2.Directory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: Digest) -> re_pb2.Directory:
        """Raises NotFound if the Directory blob is not stored, InvalidArgument if it is not one."""
        with self._lock:
            found = self._entries.get(digest)
            if found is not None:
                self._entries.move_to_end(digest)
                return found
        data = self._store.read(digest)
        try:
            directory = re_pb2.Directory.FromString(data)
        except Exception as error:
            raise InvalidArgument(f"blob {digest} is not a Directory message") from error
        with self._lock:
            self._entries[digest] = directory
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return directory


def check_name(name: str, where: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidArgument(f"input tree: {where} has an entry named {name!r}")


def _check_directory(directory: re_pb2.Directory, where: str) -> None:
    names: set[str] = set()
    all_names = [
        *(n.name for n in directory.files),
        *(n.name for n in directory.directories),
        *(n.name for n in directory.symlinks),
    ]
    for name in all_names:
        check_name(name, where)
        if name in names:
            raise InvalidArgument(f"input tree: {where} has two entries named {name!r}")
        names.add(name)
    for link in directory.symlinks:
        if not link.target or link.target.startswith("/"):
            raise InvalidArgument(
                f"input tree: symlink {where}/{link.name} -> {link.target!r}: "
                "absolute or empty targets are not supported"
            )


@dataclass
class InputTree:
    """Every Directory of an input root by relative path, checked and complete."""

    directories: list[tuple[str, re_pb2.Directory]]


def load_input_tree(cache: DirectoryCache, store: DiskBlobStore, root_digest: Digest) -> InputTree:
    """Reads and checks the whole tree; every missing Directory or file blob is reported at once
    as FAILED_PRECONDITION with one MISSING violation each."""
    directories: list[tuple[str, re_pb2.Directory]] = []
    missing: list[Digest] = []
    pending = [("", root_digest)]
    while pending:
        path, digest = pending.pop()
        try:
            directory = cache.get(digest)
        except NotFound:
            missing.append(digest)
            continue
        _check_directory(directory, path or "the input root")
        directories.append((path, directory))
        for child in directory.directories:
            child_path = f"{path}/{child.name}" if path else child.name
            pending.append((child_path, Digest.from_proto(child.digest)))
    tree = InputTree(directories)
    file_digests = {
        Digest.from_proto(node.digest) for _, directory in directories for node in directory.files
    }
    missing.extend(store.find_missing(file_digests))
    if missing:
        raise FailedPrecondition(
            f"{len(missing)} input blob(s) missing from the CAS",
            missing=sorted({d.subject() for d in missing}),
        )
    return tree


def _place_file(source: str, target: str, copy: bool) -> None:
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EMLINK):
                raise
    shutil.copyfile(source, target)
    os.chmod(target, os.stat(source).st_mode & 0o777)


def stage_input_root(
    tree: InputTree,
    store: DiskBlobStore,
    destination: Path,
    *,
    copy_files: bool,
    owner: tuple[int, int] | None,
) -> None:
    """Creates the tree under destination (which must exist).

    Files are hard links to read-only CAS blobs (0444, or 0555 when executable); an
    action that runs as root would ignore those modes, so for it they are copies
    (`copy_files`). Directories belong to `owner` so the action can create outputs.
    This is the per-action hot path for big trees, so it works on plain strings; the
    hashes it puts into paths were validated by load_input_tree, the only maker of an
    InputTree.
    """
    root = str(destination)
    for path, directory in tree.directories:
        base = f"{root}/{path}" if path else root
        if path:
            os.makedirs(base, exist_ok=True)
        if owner is not None:
            os.chown(base, *owner)
        for subdirectory in directory.directories:
            os.makedirs(f"{base}/{subdirectory.name}", exist_ok=True)
        for file in directory.files:
            target = f"{base}/{file.name}"
            if file.digest.size_bytes == 0:
                with open(target, "xb"):
                    pass
                os.chmod(target, 0o555 if file.is_executable else 0o444)
                continue
            try:
                if file.is_executable:
                    source = str(store.require_executable(Digest.from_proto(file.digest)))
                else:
                    source = store.hash_path(file.digest.hash)
                _place_file(source, target, copy_files)
            except (FileNotFoundError, NotFound):
                # Evicted between the completeness check and now.
                digest = Digest.from_proto(file.digest)
                raise FailedPrecondition(
                    f"input blob {digest} left the CAS while staging", missing=[digest.subject()]
                ) from None
        for link in directory.symlinks:
            os.symlink(link.target, f"{base}/{link.name}")


def prepare_output_parents(
    command: re_pb2.Command, working_dir: Path, owner: tuple[int, int] | None
) -> None:
    """Creates the parent directory of every declared output (not the output itself, as the
    spec says), owned by the action's user."""
    paths = list(command.output_paths) or [*command.output_files, *command.output_directories]
    for output in paths:
        check_relative_path(output, "output path")
        parent = (working_dir / output).parent
        created = []
        probe = parent
        while not probe.exists():
            created.append(probe)
            probe = probe.parent
        parent.mkdir(parents=True, exist_ok=True)
        if owner is not None:
            for directory in created:
                os.chown(directory, *owner)


def check_relative_path(path: str, what: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{what} {path!r} must be relative, without '.', '..' or '//'")
