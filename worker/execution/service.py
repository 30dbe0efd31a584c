"""The execution domain: cache check, de-duplication, a bounded priority queue, action slots."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from typing import Protocol

import anyio
import grpc

from worker.cas.action_cache import DiskActionCache
from worker.digests import Digest
from worker.errors import Cancelled, NotFound, ResourceExhausted, Unavailable
from worker.execution.executor import now
from worker.execution.operations import OperationState, OperationStore, Stage
from worker.reapi import re_pb2, status_pb2


class Executor(Protocol):
    async def execute(
        self,
        action_digest: Digest,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
    ) -> tuple[re_pb2.ExecuteResponse, re_pb2.Action | None]: ...


log = logging.getLogger(__name__)

CANCELLED_STATUS = status_pb2.Status(
    code=grpc.StatusCode.CANCELLED.value[0], message="the operation was cancelled"
)
SHUTDOWN_STATUS = status_pb2.Status(
    code=grpc.StatusCode.UNAVAILABLE.value[0],
    message="the worker shut down before the action finished; retry it",
)
NOT_STARTED_STATUS = status_pb2.Status(
    code=grpc.StatusCode.UNAVAILABLE.value[0],
    message="the worker is shutting down and the action had not started; retry it",
)
INTERNAL_STATUS = status_pb2.Status(
    code=grpc.StatusCode.INTERNAL.value[0], message="internal error in the execution service"
)


class ExecutionService:
    """Turns Execute requests into operations and runs them, `slots` at a time.

    Identical actions in flight share one operation. Results with exit code 0, an OK
    status and no do_not_cache go into the action cache.

    Every operation ends with an ExecuteResponse. Errors of the execution (cancelled, shut
    down, internal) are that response's `status`, never the Operation's `error` (REAPI
    `Execute`: "The server MUST NOT set the `error` field of the `Operation` proto").
    """

    def __init__(
        self,
        executor: Executor,
        action_cache: DiskActionCache,
        operations: OperationStore,
        slots: int,
        queue_size: int,
    ) -> None:
        self._executor = executor
        self._action_cache = action_cache
        self.operations = operations
        self._slots = slots
        self._queue_size = queue_size
        self._queue: list[tuple[int, int, OperationState]] = []
        self._order = itertools.count()
        self._queued = asyncio.Condition()
        self._in_flight: dict[Digest, OperationState] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._shutdown_status = SHUTDOWN_STATUS

    @property
    def running_count(self) -> int:
        """Actions holding a slot (being executed)."""
        return sum(1 for s in self._in_flight.values() if s.stage == Stage.EXECUTING)

    @property
    def queue_length(self) -> int:
        """Actions waiting for a slot; a cancelled one leaves the queue at once."""
        return len(self._queue)

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._slots)]

    async def drain(self, grace_s: float) -> None:
        """The first half of a graceful stop: Execute is refused (UNAVAILABLE) from now on,
        queued actions end with UNAVAILABLE at once (the client may retry them elsewhere), and
        running ones get up to `grace_s` to finish; close() then ends whatever is left."""
        self._closing = True
        queued = [state for _, _, state in self._queue if not state.done]
        for state in queued:
            state.finish_with_status(NOT_STARTED_STATUS)
            self._forget(state)
        self._queue.clear()
        running = self._running()
        log.info(
            "draining: new executions are refused, %d queued actions ended UNAVAILABLE, "
            "%d running ones get up to %g s (server.shutdown_grace_s)",
            len(queued),
            len(running),
            grace_s,
        )
        deadline = asyncio.get_running_loop().time() + grace_s
        while running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            running = self._running()
        if not running:
            log.info("drained: every running action finished")
            return
        self._shutdown_status = status_pb2.Status(
            code=grpc.StatusCode.UNAVAILABLE.value[0],
            message=f"the worker shut down and the action did not finish within the "
            f"{grace_s:g} s it was given (server.shutdown_grace_s); retry it",
        )
        log.warning(
            "%d actions still running after %g s end UNAVAILABLE, actions %s",
            len(running),
            grace_s,
            ", ".join(str(state.action_digest) for state in running),
        )

    def _running(self) -> list[OperationState]:
        return [state for state in self._in_flight.values() if not state.done]

    async def close(self) -> None:
        """Stops running and queued actions. Every operation that did not finish ends with
        UNAVAILABLE in its ExecuteResponse (the client may retry), with the metadata gathered
        so far; Execute is refused from now on."""
        self._closing = True
        unfinished = {id(s): s for s in self._in_flight.values() if not s.done}
        unfinished.update((id(e[2]), e[2]) for e in self._queue if not e[2].done)
        for state in unfinished.values():
            state.cancel_requested.set()
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._queue.clear()
        for state in unfinished.values():
            state.finish_with_status(self._shutdown_status)
        self._in_flight.clear()

    async def execute(
        self, action_digest: Digest, skip_cache_lookup: bool, priority: int
    ) -> OperationState:
        if self._closing:
            raise Unavailable("the worker is shutting down; retry the action")
        if not skip_cache_lookup:
            cached = await self._cached(action_digest)
            if cached is not None:
                state = self.operations.create(action_digest)
                state.finish(re_pb2.ExecuteResponse(result=cached, cached_result=True))
                return state
        running = self._in_flight.get(action_digest)
        if running is not None and not running.done:
            return running
        if len(self._queue) >= self._queue_size:
            raise ResourceExhausted(
                f"the execution queue is full ({self._queue_size} actions); retry later"
            )
        state = self.operations.create(action_digest)
        state.metadata.queued_timestamp.CopyFrom(now())
        state.set_stage(Stage.QUEUED)
        self._in_flight[action_digest] = state
        async with self._queued:
            heapq.heappush(self._queue, (priority, next(self._order), state))
            self._queued.notify()
        return state

    async def _cached(self, action_digest: Digest) -> re_pb2.ActionResult | None:
        try:
            return await anyio.to_thread.run_sync(self._action_cache.get, action_digest)
        except NotFound:
            return None

    def cancel(self, name: str) -> None:
        """CancelOperation by name; NotFound for a name this server does not know."""
        self.cancel_state(self.operations.get(name))

    def cancel_state(self, state: OperationState) -> None:
        """Cancels an operation given its state, which works even after DeleteOperation
        removed its name. A queued one leaves the queue and ends now; a running one ends
        when the executor has stopped its processes."""
        if state.done:
            return
        state.cancel_requested.set()
        if state.stage != Stage.EXECUTING:
            self._drop_queued(state)
            state.finish_with_status(CANCELLED_STATUS)
            self._forget(state)

    def delete(self, name: str) -> None:
        """DeleteOperation: forgets the name (NotFound if unknown). A running action goes on
        (until its streams are all gone, when the servicer cancels it), but a new Execute of
        the same action no longer joins it, since its name would not resolve."""
        state = self.operations.get(name)
        self.operations.delete(name)
        self._forget(state)

    def _drop_queued(self, state: OperationState) -> None:
        remaining = [entry for entry in self._queue if entry[2] is not state]
        if len(remaining) != len(self._queue):
            heapq.heapify(remaining)
            self._queue[:] = remaining

    def _forget(self, state: OperationState) -> None:
        if self._in_flight.get(state.action_digest) is state:
            del self._in_flight[state.action_digest]

    async def _work(self) -> None:
        while True:
            async with self._queued:
                while not self._queue:
                    await self._queued.wait()
                _, _, state = heapq.heappop(self._queue)
            if state.done:
                continue
            try:
                await self._run(state)
            except Exception:
                log.exception("executing %s failed unexpectedly", state.action_digest)
                state.finish_with_status(INTERNAL_STATUS)
            finally:
                self._forget(state)

    async def _run(self, state: OperationState) -> None:
        state.set_stage(Stage.EXECUTING)
        try:
            response, action = await self._executor.execute(
                state.action_digest, state.metadata, state.cancel_requested
            )
        except Cancelled as error:
            if self._closing:
                state.finish_with_status(self._shutdown_status)
            else:
                code = CANCELLED_STATUS.code
                state.finish_with_status(status_pb2.Status(code=code, message=str(error)))
            return
        if (
            action is not None
            and not action.do_not_cache
            and response.status.code == 0
            and response.result.exit_code == 0
        ):
            try:
                await anyio.to_thread.run_sync(
                    self._action_cache.put, state.action_digest, response.result
                )
            except Exception as error:
                log.warning("could not cache the result of %s: %s", state.action_digest, error)
        state.finish(response)
