from __future__ import annotations

from pathlib import Path

import pytest

from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import NotFound
from worker.reapi import re_pb2

ACTION = Digest.of(b"action")


def result_with_file(store: DiskBlobStore, data: bytes) -> re_pb2.ActionResult:
    digest = Digest.of(data)
    store.put(digest, data)
    return re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=digest.to_proto())], exit_code=0
    )


def test_put_then_get_returns_the_result_and_survives_restart(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=1 << 20)
    cache = DiskActionCache(tmp_path / "ac", store)
    result = result_with_file(store, b"x" * 10)
    cache.put(ACTION, result)
    assert cache.get(ACTION) == result
    reopened = DiskActionCache(tmp_path / "ac", DiskBlobStore(tmp_path / "cas", 1 << 20))
    assert reopened.get(ACTION) == result


def test_unknown_action_is_not_found(tmp_path: Path) -> None:
    cache = DiskActionCache(tmp_path / "ac", DiskBlobStore(tmp_path / "cas", 1 << 20))
    with pytest.raises(NotFound):
        cache.get(ACTION)


def test_result_whose_output_was_evicted_is_a_miss(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=2000)
    cache = DiskActionCache(tmp_path / "ac", store)
    cache.put(ACTION, result_with_file(store, b"a" * 1500))
    filler = b"b" * 1500
    store.put(Digest.of(filler), filler)  # evicts the output
    with pytest.raises(NotFound, match="evicted"):
        cache.get(ACTION)


def test_result_whose_tree_or_tree_contents_are_missing_is_a_miss(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path / "cas", max_bytes=1 << 20)
    cache = DiskActionCache(tmp_path / "ac", store)
    inner = Digest.of(b"inner file")
    tree = re_pb2.Tree(
        root=re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=inner.to_proto())])
    )
    tree_bytes = tree.SerializeToString()
    store.put(Digest.of(tree_bytes), tree_bytes)
    result = re_pb2.ActionResult(
        output_directories=[
            re_pb2.OutputDirectory(path="d", tree_digest=Digest.of(tree_bytes).to_proto())
        ]
    )
    cache.put(ACTION, result)
    with pytest.raises(NotFound):
        cache.get(ACTION)  # the file inside the tree is missing
    store.put(inner, b"inner file")
    assert cache.get(ACTION) == result
