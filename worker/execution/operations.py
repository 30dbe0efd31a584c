"""Long-running operations: their state, change notification, and a bounded store of them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from worker.digests import Digest
from worker.errors import InvalidArgument, NotFound
from worker.reapi import ops_pb2, re_pb2, status_pb2

Stage = re_pb2.ExecutionStage


class OperationState:
    """One Execute operation. Changes wake every stream that follows it.

    A finished operation always carries an ExecuteResponse, and any error (cancelled, shut
    down, internal) is that response's `status`: REAPI's `Execute` says errors "that occurred
    while running the action will be reported in the `status` field of the `ExecuteResponse`.
    The server MUST NOT set the `error` field of the `Operation` proto"."""

    def __init__(
        self,
        name: str,
        action_digest: Digest,
        clock: Callable[[], float] = time.monotonic,
        on_finish: Callable[[OperationState], None] | None = None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._on_finish = on_finish
        self.action_digest = action_digest
        self.stage: re_pb2.ExecutionStage.Value.ValueType = Stage.CACHE_CHECK
        self.response: re_pb2.ExecuteResponse | None = None
        self.cancel_requested = asyncio.Event()
        self.watchers = 0
        self.metadata = re_pb2.ExecutedActionMetadata()
        self.finished_at: float | None = None
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.response is not None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def set_stage(self, stage: re_pb2.ExecutionStage.Value.ValueType) -> None:
        if not self.done and stage != self.stage:
            self.stage = stage
            self._notify()

    def finish(self, response: re_pb2.ExecuteResponse) -> None:
        """Ends the operation with `response` (a no-op if it has ended already)."""
        if not self.done:
            self.stage = Stage.COMPLETED
            self.response = response
            self.finished_at = self._clock()
            self._notify()
            if self._on_finish is not None:
                self._on_finish(self)

    def finish_with_status(self, status: status_pb2.Status) -> None:
        """Ends the operation with an ExecuteResponse whose status is `status` (CANCELLED,
        UNAVAILABLE, INTERNAL...) and whose result holds the metadata gathered so far."""
        response = re_pb2.ExecuteResponse(status=status)
        if self.metadata.ByteSize():
            response.result.execution_metadata.CopyFrom(self.metadata)
        self.finish(response)

    def to_proto(self) -> ops_pb2.Operation:
        operation = ops_pb2.Operation(name=self.name, done=self.done)
        operation.metadata.Pack(
            re_pb2.ExecuteOperationMetadata(
                stage=self.stage, action_digest=self.action_digest.to_proto()
            )
        )
        if self.response is not None:
            operation.response.Pack(self.response)
        return operation

    async def updates(self) -> AsyncIterator[ops_pb2.Operation]:
        """The current state, then every change, ending after the final (done) state."""
        while True:
            changed = self._changed
            snapshot = self.to_proto()
            yield snapshot
            if snapshot.done:
                return
            await changed.wait()


class OperationStore:
    """Keeps running operations, and finished ones for `keep_done_s` (at most `max_done`).

    A name (`operations/` and a random UUID) is the only handle to an operation: whoever was
    given it can follow, cancel or delete the operation, and nobody can guess it."""

    def __init__(
        self,
        keep_done_s: float = 3600,
        max_done: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        on_finish: Callable[[re_pb2.ExecuteResponse], None] | None = None,
    ) -> None:
        """`on_finish` sees every operation's final response once (the metrics)."""
        self._on_finish = on_finish
        self._keep_done_s = keep_done_s
        self._max_done = max_done
        self._clock = clock
        self._operations: OrderedDict[str, OperationState] = OrderedDict()
        # Finished operations in the order they finished: pruning looks only at the oldest.
        self._done: OrderedDict[str, OperationState] = OrderedDict()

    def create(self, action_digest: Digest) -> OperationState:
        self._prune()
        state = OperationState(
            f"operations/{uuid.uuid4()}", action_digest, self._clock, self._finished
        )
        self._operations[state.name] = state
        return state

    def _finished(self, state: OperationState) -> None:
        if self._on_finish is not None and state.response is not None:
            self._on_finish(state.response)
        if self._operations.get(state.name) is state:
            self._done[state.name] = state

    def get(self, name: str) -> OperationState:
        state = self._operations.get(name)
        if state is None:
            raise NotFound(f"no operation named {name!r} (finished ones are kept for a while)")
        return state

    def delete(self, name: str) -> None:
        self.get(name)
        del self._operations[name]
        self._done.pop(name, None)

    def page(self, page_size: int, page_token: str) -> tuple[list[OperationState], str]:
        """Operations in creation order, for an operator interface only: listing them on the
        public port would hand out every client's operation names."""
        if page_size < 0:
            raise InvalidArgument(f"page_size {page_size} is negative")
        names = list(self._operations)
        start = 0
        if page_token:
            if page_token not in self._operations:
                raise InvalidArgument(f"page_token {page_token!r} is not valid (any more)")
            start = names.index(page_token)
        size = page_size or 100
        chosen = names[start : start + size]
        following = names[start + size] if start + size < len(names) else ""
        return [self._operations[n] for n in chosen], following

    def __len__(self) -> int:
        return len(self._operations)

    def _prune(self) -> None:
        """Forgets finished operations older than keep_done_s, and the oldest ones beyond
        max_done; constant time per operation, however many are kept."""
        cutoff = self._clock() - self._keep_done_s
        while self._done:
            name, oldest = next(iter(self._done.items()))
            finished_at = oldest.finished_at
            if (
                len(self._done) <= self._max_done
                and finished_at is not None
                and finished_at >= cutoff
            ):
                return
            del self._done[name]
            self._operations.pop(name, None)
