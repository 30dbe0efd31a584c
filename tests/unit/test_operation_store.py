"""The operation store keeps running operations always, finished ones for a while and at most
so many, forgetting the oldest finished first."""

from __future__ import annotations

import pytest

from worker.digests import Digest
from worker.errors import NotFound
from worker.execution.operations import OperationStore
from worker.reapi import re_pb2

DIGEST = Digest("0" * 64, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_finished_operations_beyond_max_done_go_oldest_finished_first() -> None:
    store = OperationStore(keep_done_s=3600, max_done=2)
    first, second, third = (store.create(DIGEST) for _ in range(3))
    # Finished in another order than created: the one that finished first goes first.
    second.finish(re_pb2.ExecuteResponse())
    first.finish(re_pb2.ExecuteResponse())
    third.finish(re_pb2.ExecuteResponse())
    running = store.create(DIGEST)
    with pytest.raises(NotFound):
        store.get(second.name)
    assert store.get(first.name) is first
    assert store.get(third.name) is third
    assert store.get(running.name) is running


def test_running_operations_are_never_pruned() -> None:
    clock = Clock()
    store = OperationStore(keep_done_s=10, max_done=1, clock=clock)
    running = [store.create(DIGEST) for _ in range(5)]
    clock.now = 1000
    store.create(DIGEST)
    assert all(store.get(state.name) is state for state in running)


def test_finished_operations_expire_after_keep_done_s() -> None:
    clock = Clock()
    store = OperationStore(keep_done_s=10, max_done=100, clock=clock)
    old = store.create(DIGEST)
    old.finish(re_pb2.ExecuteResponse())
    clock.now = 5
    recent = store.create(DIGEST)
    recent.finish(re_pb2.ExecuteResponse())
    clock.now = 12
    store.create(DIGEST)
    with pytest.raises(NotFound):
        store.get(old.name)
    assert store.get(recent.name) is recent


def test_an_operation_deleted_while_running_is_not_kept_when_it_finishes() -> None:
    store = OperationStore(keep_done_s=3600, max_done=1)
    deleted = store.create(DIGEST)
    store.delete(deleted.name)
    deleted.finish(re_pb2.ExecuteResponse())
    kept = store.create(DIGEST)
    kept.finish(re_pb2.ExecuteResponse())
    store.create(DIGEST)
    assert store.get(kept.name) is kept
    with pytest.raises(NotFound):
        store.get(deleted.name)
