"""Collects an action's outputs into the CAS through directory handles, never following a link.

Runs only once no process of the action can still run, but trusts nothing the action
left: every component is opened with O_NOFOLLOW (worker.handles), files are
read from the descriptor that was checked to be a regular file, and symlinks are
recorded as symlinks, their targets resolved (when the spec asks for the target's type)
by walking the tree by hand, never by the kernel.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from worker.cas.disk_store import DiskBlobStore
from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import FailedPrecondition, ResourceExhausted
from worker.execution.inputs import check_relative_path
from worker.handles import (
    LeavesTree,
    open_dir_at,
    open_regular_file_at,
    open_relative,
    opened,
)
from worker.reapi import re_pb2

# As many symlinks as Linux follows in one lookup.
MAX_SYMLINK_HOPS = 40
# Path components walked to resolve one output symlink: bounds the work an action can ask for.
MAX_RESOLVE_STEPS = 4096


def _is_executable(mode: int) -> bool:
    return bool(mode & 0o111)


def _check_symlink_target(path: str, target: str) -> None:
    """Capabilities advertise symlink_absolute_path_strategy DISALLOWED: "If an action tries
    to create an output symlink with an absolute target, a FAILED_PRECONDITION will be
    returned." An empty target is not a symlink an input tree could carry either."""
    if not target or target.startswith("/"):
        raise FailedPrecondition(
            f"output symlink {path!r} -> {target!r}: absolute or empty targets are not "
            "supported (symlink_absolute_path_strategy DISALLOWED)"
        )


class OutputBudget:
    """The bytes one action may put into the CAS (execution.max_output_bytes), counted before
    they are copied, so an action cannot fill the store with one huge output."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, size: int, what: str) -> None:
        self.used += size
        if self.used > self.limit:
            raise ResourceExhausted(
                f"{what} takes the action's outputs past {self.limit} bytes "
                "(execution.max_output_bytes); nothing more was stored"
            )


def ingest_open_file(
    store: DiskBlobStore, dir_fd: int, name: str, what: str, budget: OutputBudget
) -> Digest | None:
    """The digest of a regular file `name` in dir_fd, copied into the CAS; None if absent or
    not a regular file."""
    opened_file = open_regular_file_at(dir_fd, name)
    if opened_file is None:
        return None
    fd, info = opened_file
    with opened(fd):
        if info.st_size == 0:
            return EMPTY_DIGEST
        budget.charge(info.st_size, what)
        # No more than was charged, even if something still writes to it.
        return store.ingest_fd(fd, what, max_bytes=info.st_size)


@dataclass
class _Frame:
    """One directory of an output tree being read: its handle and what was found so far."""

    fd: int
    message: re_pb2.Directory = field(default_factory=re_pb2.Directory)
    subdirectories: list[str] = field(default_factory=list)
    name: str = ""


class OutputCollector:
    """Reads the declared outputs below one action's working directory into an ActionResult."""

    def __init__(
        self,
        store: DiskBlobStore,
        input_root_fd: int,
        working_directory: str,
        max_depth: int,
        budget: OutputBudget,
    ) -> None:
        self._store = store
        self._budget = budget
        self._root_fd = input_root_fd
        self._workdir = working_directory
        self._max_depth = max_depth

    def collect(self, command: re_pb2.Command, result: re_pb2.ActionResult) -> None:
        if command.output_paths:
            for path in command.output_paths:
                self._collect(path, result, expect=None)
        else:
            for path in command.output_files:
                self._collect(path, result, expect="file")
            for path in command.output_directories:
                self._collect(path, result, expect="directory")

    def _full(self, path: str) -> str:
        return f"{self._workdir}/{path}" if self._workdir else path

    def _collect(self, path: str, result: re_pb2.ActionResult, expect: str | None) -> None:
        check_relative_path(path, "output path")
        parent, _, name = self._full(path).rpartition("/")
        try:
            parent_fd = open_relative(self._root_fd, parent)
        except FileNotFoundError:
            return  # An absent output is simply absent.
        except LeavesTree:
            raise FailedPrecondition(
                f"output {path!r} is reached through a symlink or a file the action put there"
            ) from None
        with opened(parent_fd):
            try:
                info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISLNK(info.st_mode):
                self._symlink(parent_fd, parent, name, path, result, expect)
            elif stat.S_ISREG(info.st_mode):
                if expect == "directory":
                    raise FailedPrecondition(f"output directory {path!r} is a regular file")
                digest = ingest_open_file(
                    self._store, parent_fd, name, f"output {path}", self._budget
                )
                if digest is None:
                    raise FailedPrecondition(f"output {path!r} changed while it was collected")
                result.output_files.add(
                    path=path, digest=digest.to_proto(), is_executable=_is_executable(info.st_mode)
                )
            elif stat.S_ISDIR(info.st_mode):
                if expect == "file":
                    # "If an output listed in output_files was found, but was a directory
                    # rather than a regular file, the server will return a FAILED_PRECONDITION."
                    raise FailedPrecondition(f"output file {path!r} is a directory")
                tree_digest = self._tree(parent_fd, name, path)
                result.output_directories.add(path=path, tree_digest=tree_digest.to_proto())
            else:
                raise FailedPrecondition(
                    f"output {path!r} is neither a file, a directory nor a symlink"
                )

    def _symlink(
        self,
        parent_fd: int,
        parent: str,
        name: str,
        path: str,
        result: re_pb2.ActionResult,
        expect: str | None,
    ) -> None:
        target = os.readlink(name, dir_fd=parent_fd)
        _check_symlink_target(path, target)
        link = re_pb2.OutputSymlink(path=path, target=target)
        if expect is None:
            result.output_symlinks.append(link)
            return
        # "If an output symbolic link of the same name as listed in output_files of the
        # Command was found, but its target type was not a regular file, the server will
        # return a FAILED_PRECONDITION" (and likewise for output_directories).
        kind = self._target_kind(parent, target)
        if expect == "file":
            if kind != "file":
                raise FailedPrecondition(
                    f"output file {path!r} is a symlink to {target!r}, which is not a regular "
                    "file in the action's tree"
                )
            result.output_file_symlinks.append(link)
        else:
            if kind != "directory":
                raise FailedPrecondition(
                    f"output directory {path!r} is a symlink to {target!r}, which is not a "
                    "directory in the action's tree"
                )
            result.output_directory_symlinks.append(link)

    def _target_kind(self, link_parent: str, target: str) -> str | None:
        """What a relative symlink target names inside the input root, resolving further
        symlinks by hand: "file", "directory", or None (absent, outside the root, a loop, or
        more than MAX_RESOLVE_STEPS path components to walk). One open handle per level of
        the resolved path, so each step costs a constant number of system calls."""
        stack = [os.dup(self._root_fd)]
        try:
            for part in link_parent.split("/") if link_parent else ():
                stack.append(open_dir_at(stack[-1], part))
            pending = target.split("/")
            pending.reverse()
            hops = steps = 0
            while pending:
                steps += 1
                if steps > MAX_RESOLVE_STEPS:
                    return None
                part = pending.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if len(stack) == 1:
                        return None  # out of the input root
                    os.close(stack.pop())
                    continue
                info = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    hops += 1
                    inner = os.readlink(part, dir_fd=stack[-1])
                    if hops > MAX_SYMLINK_HOPS or inner.startswith("/"):
                        return None
                    pending.extend(reversed(inner.split("/")))
                elif stat.S_ISDIR(info.st_mode):
                    if len(stack) > self._max_depth:
                        return None
                    stack.append(open_dir_at(stack[-1], part))
                elif stat.S_ISREG(info.st_mode) and not pending:
                    return "file"
                else:
                    return None
            return "directory"
        except (FileNotFoundError, LeavesTree):
            return None
        finally:
            for fd in stack:
                os.close(fd)

    def _tree(self, parent_fd: int, name: str, path: str) -> Digest:
        """Stores the directory as a Tree and returns the Tree's digest. Depth-first without
        recursion; one open handle per level, at most max_depth levels."""
        children: dict[Digest, re_pb2.Directory] = {}
        stack = [self._open_frame(parent_fd, name, path)]
        try:
            root: re_pb2.Directory | None = None
            while stack:
                frame = stack[-1]
                if frame.subdirectories:
                    child = frame.subdirectories.pop()
                    if len(stack) > self._max_depth:
                        raise FailedPrecondition(
                            f"output directory {path!r} is deeper than {self._max_depth} levels"
                        )
                    stack.append(self._open_frame(frame.fd, child, path))
                    continue
                stack.pop()
                os.close(frame.fd)
                frame.message.directories.sort(key=lambda node: node.name)
                if not stack:
                    root = frame.message
                    break
                data = frame.message.SerializeToString(deterministic=True)
                digest = Digest.of(data)
                children.setdefault(digest, frame.message)
                stack[-1].message.directories.add(name=frame.name, digest=digest.to_proto())
        finally:
            for frame in stack:
                os.close(frame.fd)
        assert root is not None
        tree = re_pb2.Tree(root=root, children=list(children.values()))
        data = tree.SerializeToString(deterministic=True)
        tree_digest = Digest.of(data)
        self._store.put(tree_digest, data)
        return tree_digest

    def _open_frame(self, parent_fd: int, name: str, path: str) -> _Frame:
        """Opens one directory and reads its files and symlinks; subdirectories are listed
        for the caller to descend into."""
        try:
            fd = open_dir_at(parent_fd, name)
        except (LeavesTree, FileNotFoundError):
            raise FailedPrecondition(
                f"output directory {path!r} changed while it was collected"
            ) from None
        frame = _Frame(fd=fd, name=name)
        try:
            with os.scandir(fd) as entries:
                ordered = sorted(entries, key=lambda e: e.name)
            for entry in ordered:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    target = os.readlink(entry.name, dir_fd=fd)
                    _check_symlink_target(f"{path}/…/{entry.name}", target)
                    frame.message.symlinks.add(name=entry.name, target=target)
                elif stat.S_ISREG(info.st_mode):
                    digest = ingest_open_file(
                        self._store, fd, entry.name, f"output in {path}", self._budget
                    )
                    if digest is None:
                        raise FailedPrecondition(
                            f"output directory {path!r} changed while it was collected"
                        )
                    frame.message.files.add(
                        name=entry.name,
                        digest=digest.to_proto(),
                        is_executable=_is_executable(info.st_mode),
                    )
                elif stat.S_ISDIR(info.st_mode):
                    frame.subdirectories.append(entry.name)
                # Sockets, FIFOs and devices have no REAPI representation and are left out.
        except BaseException:
            os.close(fd)
            raise
        frame.subdirectories.reverse()
        return frame


def collect_stream(
    store: DiskBlobStore, control_fd: int, name: str, budget: OutputBudget
) -> Digest:
    """stdout or stderr from the runner's root-only control directory; the empty digest if
    the runner never made it."""
    digest = ingest_open_file(store, control_fd, name, name, budget)
    return digest if digest is not None else EMPTY_DIGEST
