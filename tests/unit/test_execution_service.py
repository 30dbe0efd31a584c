"""ExecutionService and operations with an in-memory executor: queueing, dedup, cache, cancel.

How a finished Execute operation reports an error follows REAPI v2 (remote_execution.proto):
the `Execute` rpc says errors that occur while running the action "will be reported in the
`status` field of the `ExecuteResponse`. The server MUST NOT set the `error` field of the
`Operation` proto", and `ExecuteResponse.status` lists `CANCELLED` among them; our own
protos/.../remote_execution.proto says the same of ExecuteResponse ("Failures while running the
action are reported in status, not as an RPC error")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import Cancelled, NotFound, ResourceExhausted, Unavailable
from worker.execution.operations import OperationState, OperationStore, Stage
from worker.execution.service import ExecutionService
from worker.reapi import ops_pb2, re_pb2, status_pb2
from worker.server.execution import OperationFollower

CANCELLED = grpc.StatusCode.CANCELLED.value[0]


class ScriptedExecutor:
    """Runs nothing: each action waits for `release` (or cancel) and exits with `exit_code`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[Digest] = []
        self.exit_code = 0
        self.status_code = 0
        self.do_not_cache = False
        self.crash: Exception | None = None
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
        metadata.worker = "scripted"
        self._one_more.set()
        if self.crash is not None:
            raise self.crash
        release = asyncio.create_task(self.release.wait())
        cancel = asyncio.create_task(cancelled.wait())
        await asyncio.wait({release, cancel}, return_when=asyncio.FIRST_COMPLETED)
        release.cancel()
        cancel.cancel()
        if cancelled.is_set():
            raise Cancelled("cancelled")
        result = re_pb2.ActionResult(exit_code=self.exit_code, execution_metadata=metadata)
        response = re_pb2.ExecuteResponse(
            result=result, status=status_pb2.Status(code=self.status_code)
        )
        return response, re_pb2.Action(do_not_cache=self.do_not_cache)


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
@pytest.mark.parametrize(
    ("exit_code", "do_not_cache", "status_code"),
    [(1, False, 0), (0, True, 0), (0, False, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])],
)
async def test_failures_and_do_not_cache_are_not_cached(
    parts: tuple[ScriptedExecutor, DiskActionCache],
    exit_code: int,
    do_not_cache: bool,
    status_code: int,
) -> None:
    """ExecuteResponse.status: "If the status code is other than `OK`, then the result MUST NOT
    be cached"; Action.do_not_cache likewise; a non-zero exit code is our own rule."""
    executor, _ = parts
    executor.exit_code, executor.do_not_cache = exit_code, do_not_cache
    executor.status_code = status_code
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


def unpacked(state: OperationState) -> tuple[ops_pb2.Operation, re_pb2.ExecuteResponse]:
    """The operation as a client sees it, and the ExecuteResponse packed in it."""
    operation = state.to_proto()
    assert operation.done
    assert operation.WhichOneof("result") == "response", operation
    response = re_pb2.ExecuteResponse()
    assert operation.response.Unpack(response)
    return operation, response


@pytest.mark.anyio
async def test_cancel_of_queued_and_of_running_operations(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    """A cancelled operation is done with an ExecuteResponse whose status is CANCELLED (REAPI
    `Execute`: "`CANCELLED`: The operation was cancelled by the client", reported "in the
    `status` field of the `ExecuteResponse`. The server MUST NOT set the `error` field of the
    `Operation` proto"), carrying the metadata gathered so far. Nothing is cached."""
    executor, cache = parts
    svc = service(parts, slots=1)
    running = await svc.execute(digest(0), skip_cache_lookup=True, priority=0)
    await executor.wait_started(1)
    queued = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    svc.cancel(queued.name)
    _, response = unpacked(queued)
    assert response.status.code == CANCELLED
    assert response.result.execution_metadata.queued_timestamp.ToNanoseconds() > 0
    svc.cancel(running.name)
    await settle()
    _, response = unpacked(running)
    assert response.status.code == CANCELLED
    assert response.result.execution_metadata.worker == "scripted"
    assert executor.started == [digest(0)]  # the queued one never started
    for action in (digest(0), digest(1)):
        with pytest.raises(NotFound):
            cache.get(action)
    await svc.close()


@pytest.mark.anyio
async def test_internal_error_is_an_internal_status_in_the_execute_response(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    """REAPI `Execute` lists "`INTERNAL`: An internal error occurred in the execution engine or
    the worker" among the errors reported in ExecuteResponse.status, never Operation.error."""
    executor, cache = parts
    executor.crash = RuntimeError("a bug")
    svc = service(parts)
    state = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    operations = [op async for op in state.updates()]
    assert not operations[-1].HasField("error")
    _, response = unpacked(state)
    assert response.status.code == grpc.StatusCode.INTERNAL.value[0]
    assert response.result.execution_metadata.worker == "scripted"
    with pytest.raises(NotFound):
        cache.get(digest(1))
    await svc.close()


@pytest.mark.anyio
async def test_shutdown_ends_unfinished_operations_with_unavailable(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    """At shutdown every operation that did not finish, running or queued, is done with an
    ExecuteResponse whose status is UNAVAILABLE (REAPI `Execute`: "`UNAVAILABLE`: Due to a
    transient condition ... The client should retry"), not left open nor given an
    Operation.error. Execute after shutdown is refused with UNAVAILABLE."""
    executor, _ = parts
    svc = service(parts, slots=1)
    running = await svc.execute(digest(0), skip_cache_lookup=True, priority=0)
    await executor.wait_started(1)
    queued = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    await svc.close()
    for state in (running, queued):
        _, response = unpacked(state)
        assert response.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert unpacked(running)[1].result.execution_metadata.worker == "scripted"
    with pytest.raises(Unavailable):
        await svc.execute(digest(2), skip_cache_lookup=True, priority=0)


@pytest.mark.anyio
async def test_cancelled_queued_operations_do_not_count_against_the_queue_bound(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    """A queue holding only cancelled operations still accepts new work: the bound counts
    live queued actions only."""
    svc = service(parts, slots=1, queue=2)
    await svc.execute(digest(0), skip_cache_lookup=True, priority=0)  # occupies the slot
    await settle()
    for n in (1, 2):
        queued = await svc.execute(digest(n), skip_cache_lookup=True, priority=0)
        svc.cancel(queued.name)
    assert svc.queue_length == 0
    for n in (3, 4):
        await svc.execute(digest(n), skip_cache_lookup=True, priority=0)
    with pytest.raises(ResourceExhausted):
        await svc.execute(digest(5), skip_cache_lookup=True, priority=0)
    await svc.close()


@pytest.mark.anyio
async def test_abandoned_operation_deleted_meanwhile_is_cancelled_without_error(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    """An operation whose last stream went away and which DeleteOperation removed before the
    grace period ended is still cancelled when the grace ends, and the timer callback raises
    nothing (before, its name lookup raised NotFound inside the event loop)."""
    executor, _ = parts
    loop = asyncio.get_running_loop()
    raised: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: raised.append(context))
    try:
        svc = service(parts)
        follower = OperationFollower(svc, grace_s=0.05)
        state = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
        stream = follower.follow(state)
        await anext(stream)
        await executor.wait_started(1)
        await stream.aclose()  # the only client went away
        svc.operations.delete(state.name)
        # The grace timer fires after 0.05 s; on a loaded machine the cancelled executor may
        # take a while longer to end.
        async with asyncio.timeout(10):
            async for _ in state.updates():
                pass
        assert raised == []
        _, response = unpacked(state)
        assert response.status.code == CANCELLED
        with pytest.raises(NotFound):
            svc.operations.get(state.name)
        await svc.close()
    finally:
        loop.set_exception_handler(previous)


@pytest.mark.anyio
async def test_deleted_running_operation_is_not_joined_by_a_new_execute(
    parts: tuple[ScriptedExecutor, DiskActionCache],
) -> None:
    """After DeleteOperation, a new Execute of the same action gets an operation whose name
    it can follow, not the deleted one (whose name no longer resolves)."""
    executor, _ = parts
    svc = service(parts, slots=2)
    first = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    await executor.wait_started(1)
    svc.delete(first.name)
    second = await svc.execute(digest(1), skip_cache_lookup=True, priority=0)
    assert second is not first
    assert svc.operations.get(second.name) is second
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
