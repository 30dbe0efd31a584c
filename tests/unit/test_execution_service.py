"""ExecutionService and operations with an in-memory executor: queueing, dedup, cache, cancel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import Cancelled, ResourceExhausted
from worker.execution.operations import OperationStore, Stage
from worker.execution.service import ExecutionService
from worker.reapi import re_pb2


class ScriptedExecutor:
    """Runs nothing: each action waits for `release` (or cancel) and exits with `exit_code`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[Digest] = []
        self.exit_code = 0
        self.do_not_cache = False
        self._one_more = asyncio.Event()

    async def wait_started(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.started) < count:
                await self._one_more.wait()
                self._one_more.clear()

    async def execute(
        self,
        action_digest: Digest,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
    ) -> tuple[re_pb2.ExecuteResponse, re_pb2.Action | None]:
        self.started.append(action_digest)
        self._one_more.set()
        release = asyncio.create_task(self.release.wait())
        cancel = asyncio.create_task(cancelled.wait())
        await asyncio.wait({release, cancel}, return_when=asyncio.FIRST_COMPLETED)
        release.cancel()
        cancel.cancel()
        if cancelled.is_set():
            raise Cancelled("cancelled")
        result = re_pb2.ActionResult(exit_code=self.exit_code)
        return re_pb2.ExecuteResponse(result=result), re_pb2.Action(do_not_cache=self.do_not_cache)


def digest(n: int) -> Digest:
    return Digest.of(f"action {n}".encode())


@pytest.fixture
def parts(tmp_path: Path) -> tuple[ScriptedExecutor, DiskActionCache]:
    store = DiskBlobStore(tmp_path / "cas", 1 << 20)
    return ScriptedExecutor(), DiskActionCache(tmp_path / "ac", store)


def service(
    parts: tuple[ScriptedExecutor, DiskActionCache], slots: int = 1, queue: int = 10
) -> ExecutionService:
    executor, cache = parts
    started = ExecutionService(executor, cache, OperationStore(), slots=slots, queue_size=queue)
    started.start()
    return started


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_successful_result_is_cached_and_served_from_cache(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    executor, _ = parts
    svc = service(parts)
    executor.release.set()
    state = await svc.execute(digest(1), skip_cache_lookup=False, priority=0)
    stages = [op async for op in state.updates()]
    assert stages[-1].done
    again = await svc.execute(digest(1), skip_cache_lookup=False, priority=0)
    assert again.done and again.response is not None and again.response.cached_result
    assert executor.started == [digest(1)]
    await svc.close()


@pytest.mark.anyio
@pytest.mark.parametrize(("exit_code", "do_not_cache"), [(1, False), (0, True)])
async def test_failures_and_do_not_cache_are_not_cached(
    parts: tuple[ScriptedExecutor, DiskActionCache], exit_code: int, do_not_cache: bool
) -> None:
    executor, _ = parts
    executor.exit_code, executor.do_not_cache = exit_code, do_not_cache
    executor.release.set()
    svc = service(parts)
    state = await svc.execute(digest(1), skip_cache_lookup=False, priority=0)
    [op async for op in state.updates()]
    again = await svc.execute(digest(1), skip_cache_lookup=False, priority=0)
    assert again is not state
    [op async for op in again.updates()]
    assert executor.started == [digest(1), digest(1)]
    await svc.close()


@pytest.mark.anyio
async def test_identical_actions_in_flight_share_one_operation(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    svc = service(parts)
    first = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    second = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    assert first is second
    await svc.close()


@pytest.mark.anyio
async def test_lower_priority_value_runs_first(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    executor, _ = parts
    svc = service(parts, slots=1)
    await svc.execute(digest(0), skip_cache_lookup=True, priority=0)  # occupies the slot
    await settle()
    await svc.execute(digest(1), skip_cache_lookup=True, priority=5)
    await svc.execute(digest(2), skip_cache_lookup=True, priority=-5)
    executor.release.set()
    await executor.wait_started(3)
    assert executor.started == [digest(0), digest(2), digest(1)]
    await svc.close()


@pytest.mark.anyio
async def test_queue_bound_is_resource_exhausted(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    svc = service(parts, slots=1, queue=1)
    await svc.execute(digest(0), skip_cache_lookup=True, priority=0)
    await settle()
    await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    with pytest.raises(ResourceExhausted):
        await svc.execute(digest(2), skip_cache_lookup=True, priority=0)
    await svc.close()


@pytest.mark.anyio
async def test_cancel_of_queued_and_of_running_operations(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    executor, _ = parts
    svc = service(parts, slots=1)
    running = await svc.execute(digest(0), skip_cache_lookup=True, priority=0)
    await settle()
    queued = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    svc.cancel(queued.name)
    assert queued.done and queued.error is not None
    assert queued.error.code == grpc.StatusCode.CANCELLED.value[0]
    svc.cancel(running.name)
    await settle()
    assert running.done and running.error is not None
    assert executor.started == [digest(0)]  # the queued one never started
    await svc.close()


@pytest.mark.anyio
async def test_update_stream_always_ends_with_the_final_state(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    executor, _ = parts
    executor.release.set()
    svc = service(parts)
    state = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    await settle()  # finishes before anyone reads the stream
    operations = [op async for op in state.updates()]
    assert operations[-1].done
    assert state.stage == Stage.COMPLETED
    await svc.close()
