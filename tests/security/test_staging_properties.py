"""Property: whatever the input tree, output paths and later tampering, staging and output
collection touch nothing outside the action directory and read nothing from outside it.

Runs in-process as root (no Docker): hypothesis builds random input trees with symlinks,
random working directories and outputs, then plays a hostile action by swapping random
paths of the staged tree for links to a sentinel tree beside it, to the host root, or out
of the tree, renaming directories and planting files. A sentinel directory next to the
sidecar's directory stands for the rest of the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import ServiceError
from worker.execution.inputs import (
    DirectoryCache,
    check_action_paths,
    load_input_tree,
    stage_action,
)
from worker.execution.outputs import OutputBudget, OutputCollector, collect_stream
from worker.handles import open_dir_at, open_trusted_dir, opened, remove_tree
from worker.reapi import re_pb2
from worker.runner_contract import ActionDir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="staging gives directories away")

NAMES = ["a", "b", "c"]
ACTION_USER = 65534
SECRET = b"sentinel secret 5d1e"

name = st.sampled_from(NAMES)
relative = st.lists(name, min_size=1, max_size=3).map("/".join)
link_target = st.lists(st.sampled_from(["..", ".", "a", "b", "sentinel"]), min_size=1, max_size=7)

Tree = dict[str, Any]
trees: st.SearchStrategy[Tree] = st.recursive(
    st.dictionaries(
        name,
        st.one_of(
            st.tuples(st.just("file"), st.binary(max_size=8), st.booleans()),
            st.tuples(st.just("link"), link_target.map("/".join)),
        ),
        max_size=3,
    ),
    lambda children: st.dictionaries(name, st.tuples(st.just("dir"), children), max_size=3),
    max_leaves=12,
)
tamper = st.lists(
    st.tuples(
        st.sampled_from(["link", "rename", "plant", "chmod"]),
        relative,
        st.sampled_from(["/", "ABS_SENTINEL", "../../../sentinel", "../../../../..", "a", "."]),
    ),
    max_size=6,
)


def upload(store: DiskBlobStore, tree: Tree) -> Digest:
    directory = re_pb2.Directory()
    for entry_name in sorted(tree):
        kind, *rest = tree[entry_name]
        if kind == "file":
            data, executable = rest
            digest = Digest.of(data)
            store.put(digest, data)
            directory.files.add(name=entry_name, digest=digest.to_proto(), is_executable=executable)
        elif kind == "link":
            directory.symlinks.add(name=entry_name, target=rest[0] or ".")
        else:
            child = upload(store, rest[0])
            directory.directories.add(name=entry_name, digest=child.to_proto())
    data = directory.SerializeToString(deterministic=True)
    digest = Digest.of(data)
    store.put(digest, data)
    return digest


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Everything below root but `skip` and the CAS (checked on its own): mode, owner and
    content (or link target)."""
    found: dict[str, tuple[int, int, int, bytes]] = {}
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        subdirectories[:] = [
            d for d in subdirectories if here / d != skip and here / d != root / "cas"
        ]
        for entry in [*subdirectories, *files]:
            path = here / entry
            info = path.lstat()
            content = (
                os.readlink(path).encode()
                if path.is_symlink()
                else path.read_bytes()
                if path.is_file()
                else b""
            )
            found[str(path)] = (info.st_mode, info.st_uid, info.st_gid, content)
    return found


# What a hostile action does to its tree, as a program of its own: run by setpriv as the
# action's user (a fork of this process, which may hold gRPC threads from other tests, could
# crash before it dropped to that user).
TAMPER = """
import json, os, shutil, sys
from pathlib import Path
root, sentinel, moves, names = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), "abc"
for move, path, target in moves:
    where = root / path
    target = str(sentinel / "secret") if target == "ABS_SENTINEL" else target
    try:
        if move == "link":
            if where.is_dir() and not where.is_symlink():
                shutil.rmtree(where)
            elif where.exists() or where.is_symlink():
                where.unlink()
            where.parent.mkdir(parents=True, exist_ok=True)
            where.symlink_to(target)
        elif move == "rename":
            os.rename(where, root / names[len(path) % len(names)])
        elif move == "plant":
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_bytes(b"planted")
        elif not where.is_symlink():
            os.chmod(where, 0)
    except OSError:
        pass  # the action's attempts may fail; what matters is what the worker does
"""


def play_hostile_action(root: Path, moves: list[tuple[str, str, str]], sentinel: Path) -> None:
    """What an action could do to its tree before outputs are collected, done by a process
    that is the action's user, as the action would be."""
    if not moves:
        return
    user = str(ACTION_USER)
    subprocess.run(
        [
            "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--clear-groups",
            sys.executable,
            "-c",
            TAMPER,
            str(root),
            str(sentinel),
            json.dumps(moves),
        ],
        check=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="staging-property-"))
    directory.chmod(0o755)  # the action's user must reach its tree, as in a sidecar
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tree=trees,
    workdir=st.one_of(st.just(""), relative),
    outputs=st.lists(relative, max_size=4),
    legacy=st.booleans(),
    moves=tamper,
)
def test_staging_and_collection_never_leave_the_action_directory(
    sandbox: Path,
    tree: Tree,
    workdir: str,
    outputs: list[str],
    legacy: bool,
    moves: list[tuple[str, str, str]],
) -> None:
    case = Path(tempfile.mkdtemp(dir=sandbox))
    case.chmod(0o755)
    sentinel = case / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_bytes(SECRET)
    (sentinel / "a").mkdir()
    sidecar_dir = case / "sidecar"
    sidecar_dir.mkdir()
    # Closed before the directory goes: its journal thread must be done by then.
    with closing(DiskBlobStore(case / "cas", max_bytes=1 << 30)) as store:
        root_digest = upload(store, tree)
        command = re_pb2.Command(arguments=["true"], working_directory=workdir)
        if legacy:
            command.output_files.extend(outputs[::2])
            command.output_directories.extend(outputs[1::2])
        else:
            command.output_paths.extend(outputs)
        before = snapshot(case, skip=sidecar_dir)
        action = ActionDir.new(sidecar_dir)

        loaded = load_input_tree(DirectoryCache(store), store, root_digest)
        try:
            check_action_paths(loaded, command)
        except ServiceError:
            assert list(sidecar_dir.iterdir()) == []  # refused before anything was made
            assert snapshot(case, skip=sidecar_dir) == before
            return
        stage_action(
            loaded, store, command, action, owner=(ACTION_USER, ACTION_USER), copy_files=False
        )
        assert snapshot(case, skip=sidecar_dir) == before

        play_hostile_action(action.input_root, moves, sentinel)
        result = re_pb2.ActionResult()
        try:
            with (
                opened(open_trusted_dir(sidecar_dir)) as sidecar_fd,
                opened(open_dir_at(sidecar_fd, action.name)) as action_fd,
            ):
                with opened(open_dir_at(action_fd, "control")) as control_fd:
                    collect_stream(store, control_fd, "stdout", OutputBudget(1 << 30))
                with opened(open_dir_at(action_fd, "root")) as root_fd:
                    OutputCollector(
                        store, root_fd, workdir, max_depth=64, budget=OutputBudget(1 << 30)
                    ).collect(command, result)
        except ServiceError:
            pass  # A refusal is a fine answer to tampering.
        assert snapshot(case, skip=sidecar_dir) == before
        store.flush()  # every stored blob a file, so the check below sees them all
        for blob in (case / "cas" / "blobs").rglob("*"):
            if blob.is_file():
                data = blob.read_bytes()
                assert SECRET not in data
                assert hashlib.sha256(data).hexdigest() == blob.name

        remove_tree(action.path)
        assert list(sidecar_dir.iterdir()) == []
        assert snapshot(case, skip=sidecar_dir) == before
    shutil.rmtree(case)
