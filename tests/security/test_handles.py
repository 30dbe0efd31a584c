"""What the worker does with hostile trees, without Docker: no open of anything but a regular
file, bounded symlink resolution, bounded memory for client Directories."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest

from worker import handles
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import FailedPrecondition
from worker.execution.inputs import DirectoryCache
from worker.execution.outputs import MAX_RESOLVE_STEPS, OutputBudget, OutputCollector
from worker.handles import open_regular_file_at, open_trusted_dir, opened
from worker.reapi import re_pb2


def test_a_fifo_or_device_is_never_opened(tmp_path: Path) -> None:
    """Opening a device can have effects of its own (a watchdog reboots the host when opened
    and closed); a FIFO's writer would be released. Only a regular file is opened."""
    os.mkfifo(tmp_path / "fifo")
    if os.geteuid() == 0:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    writer_opened = threading.Event()

    def writer() -> None:
        fd = os.open(tmp_path / "fifo", os.O_WRONLY)  # blocks until someone opens it to read
        writer_opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with opened(open_trusted_dir(tmp_path)) as fd:
        assert open_regular_file_at(fd, "fifo") is None
        if os.geteuid() == 0:
            assert open_regular_file_at(fd, "null") is None
    time.sleep(0.2)
    assert not writer_opened.is_set(), "the FIFO was opened"
    os.close(os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
    thread.join(5)


def test_symlink_resolution_of_an_output_is_bounded(tmp_path: Path) -> None:
    """A chain of links that climbs a deep tree and back for every hop would take minutes to
    resolve component by component from the root; resolution walks one handle per level and
    gives up (FAILED_PRECONDITION) past MAX_RESOLVE_STEPS components."""
    depth = 200
    deep = tmp_path / "/".join(["d"] * depth)
    deep.mkdir(parents=True)
    (deep / "target").write_text("x")
    up_and_down = "/".join([".."] * depth) + "/" + "/".join(["d"] * depth)
    previous = "target"
    for hop in range(30):
        os.symlink(f"{up_and_down}/{previous}", deep / f"l{hop}")
        previous = f"l{hop}"
    os.symlink("/".join(["d"] * depth) + f"/{previous}", tmp_path / "out")
    assert 30 * 2 * depth > MAX_RESOLVE_STEPS
    store = DiskBlobStore(tmp_path / "cas", 1 << 30)
    command = re_pb2.Command(arguments=["true"], output_files=["out"])
    began = time.monotonic()
    with opened(open_trusted_dir(tmp_path)) as root_fd, pytest.raises(FailedPrecondition):
        OutputCollector(store, root_fd, "", 512, OutputBudget(1 << 30)).collect(
            command, re_pb2.ActionResult()
        )
    assert time.monotonic() - began < 30  # the unbounded walk took minutes


def test_directory_cache_holds_a_bounded_number_of_bytes(tmp_path: Path) -> None:
    """Directories a client uploads are parsed to stage them; the cache of parsed ones must not
    let a client fill the worker's memory."""
    store = DiskBlobStore(tmp_path / "cas", 1 << 30)
    cache = DirectoryCache(store, max_bytes=1 << 20, max_one_bytes=64 << 10)
    for batch in range(60):
        directory = re_pb2.Directory(
            files=[
                re_pb2.FileNode(name=f"f{batch}-{i}", digest=Digest.of(b"").to_proto())
                for i in range(1000)
            ]
        )
        data = directory.SerializeToString(deterministic=True)
        digest = Digest.of(data)
        store.put(digest, data)
        assert cache.get(digest) == directory
        assert cache.held_bytes <= 1 << 20
    huge = re_pb2.Directory(
        files=[re_pb2.FileNode(name=f"h{i}", digest=Digest.of(b"").to_proto()) for i in range(5000)]
    )
    data = huge.SerializeToString(deterministic=True)
    store.put(Digest.of(data), data)
    before = cache.held_bytes
    cache.get(Digest.of(data))
    assert cache.held_bytes <= before  # too big to keep at all


def test_a_tree_removed_by_someone_else_meanwhile_counts_as_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing every leftover sidecar directory can race a sidecar's own clean-up of its
    directory: the directory vanishing between emptying and rmdir is success, not an error
    (it failed a pool close once in a full test run)."""
    victim = tmp_path / "sidecar"
    (victim / "action" / "root").mkdir(parents=True)
    (victim / "action" / "root" / "f").write_text("x")
    real_empty = handles._empty_by_flattening

    def empty_then_lose_the_race(top_fd: int) -> None:
        real_empty(top_fd)
        os.rmdir(victim)  # the other remover got there first

    monkeypatch.setattr(handles, "_empty_by_flattening", empty_then_lose_the_race)
    with handles.opened(handles.open_trusted_dir(tmp_path)) as parent_fd:
        handles.remove_tree_at(parent_fd, "sidecar")
    assert not victim.exists()
