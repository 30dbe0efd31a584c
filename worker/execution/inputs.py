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
from worker.runner_contract import ActionDir

# The largest Directory (or Action, Command) blob parsed at all. Bazel's are kilobytes; a
# client's gigabyte one would cost the worker several times its size in memory to parse.
MAX_PARSED_BLOB_BYTES = 64 << 20


def check_parsed_size(digest: Digest, kind: str = "Directory") -> None:
    """INVALID_ARGUMENT for a message blob too large to parse, by its declared size."""
    if digest.size > MAX_PARSED_BLOB_BYTES:
        raise InvalidArgument(
            f"{kind} {digest} is larger than {MAX_PARSED_BLOB_BYTES} bytes, more than this "
            "worker parses"
        )


class DirectoryCache:
    """Parsed Directory messages by digest; input trees repeat across actions.

    Bounded by the serialized size of what it holds (a parsed message takes many times
    that), and directories above `max_one_bytes` are never kept: a client must not be
    able to fill the worker's memory with Directory blobs it uploads.
    """

    def __init__(
        self,
        store: DiskBlobStore,
        max_entries: int = 50_000,
        max_bytes: int = 8 << 20,
        max_one_bytes: int = 256 << 10,
    ) -> None:
        self._store = store
        self._max = max_entries
        self._max_bytes = max_bytes
        self._max_one_bytes = max_one_bytes
        self._bytes = 0
        self._entries: OrderedDict[Digest, re_pb2.Directory] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def get(self, digest: Digest) -> re_pb2.Directory:
        """Raises NotFound if the Directory blob is not stored, InvalidArgument if it is not one."""
        with self._lock:
            found = self._entries.get(digest)
            if found is not None:
                self._entries.move_to_end(digest)
                return found
        check_parsed_size(digest)
        data = self._store.read(digest)
        try:
            directory = re_pb2.Directory.FromString(data)
        except Exception as error:
            raise InvalidArgument(f"blob {digest} is not a Directory message") from error
        if digest.size > self._max_one_bytes:
            return directory
        with self._lock:
            if digest not in self._entries:
                self._entries[digest] = directory
                self._bytes += digest.size
            while len(self._entries) > self._max or self._bytes > self._max_bytes:
                evicted, _ = self._entries.popitem(last=False)
                self._bytes -= evicted.size
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

    def kinds(self) -> dict[str, str]:
        """Every path of the tree ("" is the root): "directory", "file" or "symlink"."""
        found = {"": "directory"}
        for path, directory in self.directories:
            prefix = f"{path}/" if path else ""
            found.update((prefix + n.name, "directory") for n in directory.directories)
            found.update((prefix + n.name, "file") for n in directory.files)
            found.update((prefix + n.name, "symlink") for n in directory.symlinks)
        return found


def load_input_tree(
    cache: DirectoryCache,
    store: DiskBlobStore,
    root_digest: Digest,
    *,
    max_depth: int = 256,
    max_entries: int = 1_000_000,
) -> InputTree:
    """Reads and checks the whole tree; every missing Directory or file blob is reported at once
    as FAILED_PRECONDITION with one MISSING violation each (a damaged one, whose bytes no
    longer match its digest, is removed and reported the same). A tree deeper than `max_depth`
    directories or with more than `max_entries` entries (counted as staged: a Directory used
    twice counts twice) is INVALID_ARGUMENT."""
    directories: list[tuple[str, re_pb2.Directory]] = []
    missing: list[Digest] = []
    pending = [("", root_digest, 0)]
    entries = 0
    while pending:
        path, digest, depth = pending.pop()
        try:
            directory = cache.get(digest)
        except NotFound:
            missing.append(digest)
            continue
        _check_directory(directory, path or "the input root")
        entries += len(directory.files) + len(directory.directories) + len(directory.symlinks)
        if entries > max_entries:
            raise InvalidArgument(
                f"the input tree has more than {max_entries} entries (execution.max_input_entries)"
            )
        directories.append((path, directory))
        if directory.directories and depth + 1 > max_depth:
            raise InvalidArgument(
                f"the input tree is deeper than {max_depth} directories at {path!r} "
                "(execution.max_input_depth)"
            )
        for child in directory.directories:
            child_path = f"{path}/{child.name}" if path else child.name
            pending.append((child_path, Digest.from_proto(child.digest), depth + 1))
    tree = InputTree(directories)
    file_digests = {
        Digest.from_proto(node.digest) for _, directory in directories for node in directory.files
    }
    # Damaged blobs count as missing: a file changed since it was last known good is hashed
    # again here (once; unchanged files are not read), so no action is staged from one.
    missing.extend(store.find_missing_or_damaged(file_digests))
    if missing:
        raise FailedPrecondition(
            f"{len(missing)} input blob(s) missing from the CAS",
            missing=sorted({d.subject() for d in missing}),
        )
    return tree


def check_relative_path(path: str, what: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{what} {path!r} must be relative, without '.', '..' or '//'")
    if "\0" in path:
        raise InvalidArgument(f"{what} {path[:100]!r} holds a NUL byte")


def declared_outputs(command: re_pb2.Command) -> list[str]:
    """output_paths (v2.1+) or, for older clients, output_files and output_directories."""
    return list(command.output_paths) or [*command.output_files, *command.output_directories]


def check_action_paths(tree: InputTree, command: re_pb2.Command) -> None:
    """Refuses (INVALID_ARGUMENT) a working directory or output path that is malformed or
    passes through an input symlink or file, before anything is created: staging then only
    ever makes directories inside the action's own tree."""
    kinds = tree.kinds()

    def check(path: str, what: str, whole_path_too: bool) -> None:
        parts = path.split("/")
        prefixes = range(1, len(parts) + 1) if whole_path_too else range(1, len(parts))
        for end in prefixes:
            prefix = "/".join(parts[:end])
            kind = kinds.get(prefix)
            if kind is not None and kind != "directory":
                raise InvalidArgument(f"{what} {path!r} passes through the input {kind} {prefix!r}")

    workdir = command.working_directory
    if workdir:
        check_relative_path(workdir, "working_directory")
        check(workdir, "working_directory", whole_path_too=True)
    for output in declared_outputs(command):
        check_relative_path(output, "output path")
        check(f"{workdir}/{output}" if workdir else output, "output path", whole_path_too=False)


def _place_file(source: str, target: str, copy: bool) -> None:
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EMLINK):
                raise
    shutil.copyfile(source, target, follow_symlinks=False)
    os.chmod(target, os.stat(source).st_mode & 0o777)


class StagedDirectories:
    """Directories staging made, to be given to the action's user once all exist."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def make(self, path: str) -> None:
        os.mkdir(path, 0o755)
        self.created.append(path)

    def make_parents(self, root: str, relative: str) -> None:
        """Makes every missing directory of `relative` below root (checked beforehand
        against the input tree, so only directories are in the way)."""
        current = root
        for part in relative.split("/") if relative else ():
            current = f"{current}/{part}"
            try:
                self.make(current)
            except FileExistsError:
                pass

    def give_to(self, owner: tuple[int, int] | None) -> None:
        """Chowns deepest first: while a directory's contents are chowned, it and all its
        ancestors still belong to root, so no path used here can have been changed by the
        user it is given to (lchown, so no final symlink is followed either)."""
        if owner is None:
            return
        for path in reversed(self.created):
            os.lchown(path, *owner)


def stage_input_root(
    tree: InputTree,
    store: DiskBlobStore,
    destination: Path,
    *,
    copy_files: bool,
    directories: StagedDirectories,
) -> None:
    """Creates the tree under destination (which must exist, be new, and belong to root).

    Files are hard links to read-only CAS blobs (0444, or 0555 when executable); an
    action that runs as root would ignore those modes, so for it they are copies
    (`copy_files`). Directories are recorded in `directories`, to be given to the
    action's user afterwards. This is the per-action hot path for big trees, so it works
    on plain strings; the hashes it puts into paths were validated by load_input_tree,
    the only maker of an InputTree.
    """
    root = str(destination)
    for path, directory in tree.directories:
        base = f"{root}/{path}" if path else root
        for subdirectory in directory.directories:
            directories.make(f"{base}/{subdirectory.name}")
        for file in directory.files:
            target = f"{base}/{file.name}"
            if file.digest.size_bytes == 0:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
                os.close(fd)
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


def stage_action(
    tree: InputTree,
    store: DiskBlobStore,
    command: re_pb2.Command,
    action: ActionDir,
    *,
    owner: tuple[int, int] | None,
    copy_files: bool,
) -> Path:
    """Creates an action's directory in the (trusted) directory of its sidecar: `control/`
    for root alone, then the input root, HOME, TMPDIR, the working directory and every
    output's parent, all given to `owner` at the end. check_action_paths must have passed.
    Returns the working directory."""
    os.mkdir(action.path, 0o755)
    os.mkdir(action.control, 0o700)
    directories = StagedDirectories()
    for path in (action.input_root, action.home, action.tmp):
        directories.make(str(path))
    stage_input_root(tree, store, action.input_root, copy_files=copy_files, directories=directories)
    root = str(action.input_root)
    workdir = command.working_directory
    directories.make_parents(root, workdir)
    for output in declared_outputs(command):
        full = f"{workdir}/{output}" if workdir else output
        directories.make_parents(root, full.rpartition("/")[0])
    directories.give_to(owner)
    return action.input_root / workdir if workdir else action.input_root
