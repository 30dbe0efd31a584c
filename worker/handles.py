"""File access inside trees an action could have changed: directory handles, never a symlink.

Every helper here works relative to an open directory descriptor and opens each path
component with O_NOFOLLOW, so a name the action swapped for a symlink (or a rename in
the middle of a walk) can never lead the worker, which runs as root, out of the tree.
Nothing recurses on the Python stack, so a tree of any depth is handled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class LeavesTree(Exception):
    """A path component is a symlink or not a directory."""


def open_dir_at(dir_fd: int, name: str) -> int:
    """Opens the directory `name` in dir_fd; raises LeavesTree if it is a symlink or not a
    directory, FileNotFoundError if it is absent."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LeavesTree(name) from None
        raise


def open_relative(root_fd: int, relative: str) -> int:
    """Opens the directory at `relative` (already checked: no '.', '..' or empty parts)
    below root_fd, one component at a time. "" opens root_fd again."""
    fd = os.dup(root_fd)
    for part in relative.split("/") if relative else ():
        try:
            child = open_dir_at(fd, part)
        finally:
            os.close(fd)
        fd = child
    return fd


@contextlib.contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_trusted_dir(path: Path) -> int:
    """Opens a directory the worker alone controls (the exec root and sidecar directories
    seen from the host), still refusing a symlink at the last component."""
    return os.open(path, DIR_FLAGS)


def open_regular_file_at(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
    """Opens `name` for reading if it is a regular file; None if it is absent, a symlink or
    anything else. It is checked before the open (opening a device or a FIFO can have
    effects of its own) and again on the open descriptor (same inode, still regular)."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(before.st_mode):
        return None
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (
        before.st_dev,
        before.st_ino,
    ):
        os.close(fd)
        return None
    return fd, info


# How often a directory that keeps refilling is emptied again before removal gives up.
_REMOVE_ATTEMPTS = 5


def remove_tree_at(parent_fd: int, name: str) -> None:
    """Removes parent/name, whatever it is and however deep, without following symlinks.

    Every subdirectory found below the top directory is first moved up into the top one
    under a fresh name, then emptied and removed, so the walk needs no recursion, at most
    three open descriptors, and no new inode (it works on a full disk). Raises OSError if
    something cannot be removed (a directory that keeps refilling, say).
    """
    try:
        top_fd = open_dir_at(parent_fd, name)
    except LeavesTree:
        os.unlink(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    with opened(top_fd):
        _empty_by_flattening(top_fd)
    # Gone already: removed meanwhile by whoever else owned it (a sidecar's own clean-up
    # racing the removal of every leftover), which is what was wanted.
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent_fd)


def _empty_by_flattening(top_fd: int) -> None:
    token = uuid.uuid4().hex[:12]
    counter = 0
    # Directories still to empty, by name in the top directory ("" is the top itself).
    pending: list[tuple[str, int]] = [("", 0)]
    while pending:
        current, attempts = pending.pop()
        try:
            fd = os.dup(top_fd) if not current else open_dir_at(top_fd, current)
        except LeavesTree:
            os.unlink(current, dir_fd=top_fd)
            continue
        except FileNotFoundError:
            continue
        with opened(fd):
            with os.scandir(fd) as entries:
                children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
            for child, is_dir in children:
                if is_dir and not current:
                    pending.append((child, 0))
                elif is_dir:
                    moved = f".rm-{token}-{counter}"
                    counter += 1
                    os.rename(child, moved, src_dir_fd=fd, dst_dir_fd=top_fd)
                    pending.append((moved, 0))
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(child, dir_fd=fd)
        if not current:
            continue
        try:
            os.rmdir(current, dir_fd=top_fd)
        except OSError as error:
            if error.errno != errno.ENOTEMPTY or attempts + 1 >= _REMOVE_ATTEMPTS:
                raise
            pending.append((current, attempts + 1))


def remove_tree(path: Path) -> None:
    """remove_tree_at for a path whose parent the worker alone controls."""
    with opened(open_trusted_dir(path.parent)) as parent_fd:
        remove_tree_at(parent_fd, path.name)


def empty_dir(path: Path) -> None:
    """Removes everything inside a directory the worker alone controls, keeping the directory
    itself (its inode may be bind-mounted)."""
    with opened(open_trusted_dir(path)) as fd:
        for name in os.listdir(fd):
            remove_tree_at(fd, name)
