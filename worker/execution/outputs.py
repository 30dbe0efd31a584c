"""Collects an action's outputs into the CAS: files, directories as Trees, symlinks as symlinks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import FailedPrecondition
from worker.execution.inputs import check_relative_path
from worker.reapi import re_pb2


def _is_executable(mode: int) -> bool:
    return bool(mode & 0o111)


class OutputCollector:
    """Reads outputs below one action's working directory; never follows a symlink."""

    def __init__(self, store: DiskBlobStore, action_root: Path, working_dir: Path) -> None:
        self._store = store
        self._action_root = action_root.resolve()
        self._working_dir = working_dir

    def collect(self, command: re_pb2.Command, result: re_pb2.ActionResult) -> None:
        if command.output_paths:
            for path in command.output_paths:
                self._collect(path, result, expect=None)
        else:
            for path in command.output_files:
                self._collect(path, result, expect="file")
            for path in command.output_directories:
                self._collect(path, result, expect="directory")

    def _collect(self, path: str, result: re_pb2.ActionResult, expect: str | None) -> None:
        check_relative_path(path, "output path")
        full = self._working_dir / path
        if not full.parent.resolve().is_relative_to(self._action_root):
            raise FailedPrecondition(
                f"output {path!r} is reached through a symlink that leaves the action directory"
            )
        try:
            info = full.lstat()
        except FileNotFoundError:
            return  # An absent output is simply absent.
        if stat.S_ISLNK(info.st_mode):
            link = re_pb2.OutputSymlink(path=path, target=os.readlink(full))
            if expect is None:
                result.output_symlinks.append(link)
            elif expect == "file":
                result.output_file_symlinks.append(link)
            else:
                result.output_directory_symlinks.append(link)
        elif stat.S_ISREG(info.st_mode):
            if expect == "directory":
                raise FailedPrecondition(f"output directory {path!r} is a regular file")
            digest = self._store.ingest_file(full)
            result.output_files.add(
                path=path, digest=digest.to_proto(), is_executable=_is_executable(info.st_mode)
            )
        elif stat.S_ISDIR(info.st_mode):
            if expect == "file":
                raise FailedPrecondition(f"output file {path!r} is a directory")
            tree = re_pb2.Tree()
            children: dict[Digest, re_pb2.Directory] = {}
            tree.root.CopyFrom(self._directory(full, children))
            tree.children.extend(children.values())
            data = tree.SerializeToString(deterministic=True)
            tree_digest = Digest.of(data)
            self._store.put(tree_digest, data)
            result.output_directories.add(path=path, tree_digest=tree_digest.to_proto())

    def _directory(self, path: Path, children: dict[Digest, re_pb2.Directory]) -> re_pb2.Directory:
        directory = re_pb2.Directory()
        with os.scandir(path) as entries:
            ordered = sorted(entries, key=lambda e: e.name)
        for entry in ordered:
            if entry.is_symlink():
                directory.symlinks.add(name=entry.name, target=os.readlink(entry.path))
            elif entry.is_file(follow_symlinks=False):
                digest = self._store.ingest_file(Path(entry.path))
                mode = entry.stat(follow_symlinks=False).st_mode
                directory.files.add(
                    name=entry.name, digest=digest.to_proto(), is_executable=_is_executable(mode)
                )
            elif entry.is_dir(follow_symlinks=False):
                child = self._directory(Path(entry.path), children)
                data = child.SerializeToString(deterministic=True)
                child_digest = Digest.of(data)
                children.setdefault(child_digest, child)
                directory.directories.add(name=entry.name, digest=child_digest.to_proto())
            # Sockets, FIFOs and devices have no REAPI representation and are left out.
        return directory
