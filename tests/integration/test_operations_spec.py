"""How finished Execute operations report errors, over real gRPC with the real Docker daemon.

REAPI v2 `Execute`: "Errors discovered during creation of the `Operation` will be reported as
gRPC Status errors, while errors that occurred while running the action will be reported in the
`status` field of the `ExecuteResponse`. The server MUST NOT set the `error` field of the
`Operation` proto", listing `CANCELLED`, `UNAVAILABLE`, `INTERNAL` and `FAILED_PRECONDITION`
among them. `ExecuteResponse.status`: "Servers MUST use this field for errors in execution,
rather than the error field on the `Operation` object ... If the status code is other than
`OK`, then the result MUST NOT be cached. For an error status, the `result` field is optional".
Our protos/.../remote_execution.proto on ExecuteResponse: "The response packed in a finished
Execute Operation. Failures while running the action are reported in status, not as an RPC
error."
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from tests.execution_client import execute, shell_action, stage_of, start_execute, upload_action
from tests.images import IMAGE_A
from tests.serving import RunningService, running_service
from worker.config import Settings
from worker.digests import Digest
from worker.execution.operations import Stage
from worker.reapi import error_details_pb2, ops_grpc, ops_pb2, re_grpc, re_pb2

pytestmark = pytest.mark.docker


def response_of(operation: ops_pb2.Operation) -> re_pb2.ExecuteResponse:
    """The ExecuteResponse of a finished operation, which must not carry Operation.error."""
    assert operation.done, operation
    assert operation.WhichOneof("result") == "response", operation
    response = re_pb2.ExecuteResponse()
    assert operation.response.Unpack(response)
    return response


class Follower:
    """Reads an Execute stream in a thread; `reached(stage)` waits until it got there."""

    def __init__(self, stream: Iterator[ops_pb2.Operation]) -> None:
        self.operations: list[ops_pb2.Operation] = []
        self._stages: dict[int, threading.Event] = {
            s: threading.Event() for s in re_pb2.ExecutionStage.Value.values()
        }
        self._thread = threading.Thread(target=self._read, args=(stream,))
        self._thread.start()

    def _read(self, stream: Iterator[ops_pb2.Operation]) -> None:
        for operation in stream:
            self.operations.append(operation)
            self._stages[stage_of(operation)].set()

    def reached(self, stage: int, timeout_s: float = 30) -> str:
        assert self._stages[stage].wait(timeout_s), self.operations
        return self.operations[0].name

    def final(self, timeout_s: float = 30) -> ops_pb2.Operation:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive()
        return self.operations[-1]


def start(service: RunningService, script: str, channel: grpc.Channel | None = None) -> Follower:
    spec = shell_action(script, IMAGE_A)
    action = upload_action(service.channel, spec)
    return Follower(start_execute(channel or service.channel, action, timeout_s=90))


def cancel(service: RunningService, name: str) -> None:
    ops_grpc.OperationsStub(service.channel).CancelOperation(
        ops_pb2.CancelOperationRequest(name=name)
    )


def test_cancelled_running_operation_is_done_with_cancelled_in_its_execute_response(
    exec_service: RunningService,
) -> None:
    follower = start(exec_service, "sleep 300 # running")
    name = follower.reached(Stage.EXECUTING)
    cancel(exec_service, name)
    response = response_of(follower.final())
    assert response.status.code == grpc.StatusCode.CANCELLED.value[0]
    assert response.result.execution_metadata.worker == exec_service.service.worker_name
    got = ops_grpc.OperationsStub(exec_service.channel).GetOperation(
        ops_pb2.GetOperationRequest(name=name)
    )
    assert response_of(got) == response
    # not cached, although the action allows caching
    metadata = re_pb2.ExecuteOperationMetadata()
    follower.operations[0].metadata.Unpack(metadata)
    with pytest.raises(grpc.RpcError) as caught:
        re_grpc.ActionCacheStub(exec_service.channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=metadata.action_digest)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def one_slot_service(exec_settings: Settings) -> Iterator[RunningService]:
    execution = exec_settings.execution.model_copy(update={"max_concurrent_actions": 1})
    with running_service(exec_settings.model_copy(update={"execution": execution})) as running:
        yield running


def test_cancelled_queued_operation_is_done_with_cancelled_in_its_execute_response(
    one_slot_service: RunningService,
) -> None:
    service = one_slot_service
    running = start(service, "sleep 300 # holds the only slot")
    running_name = running.reached(Stage.EXECUTING)
    queued = start(service, "sleep 300 # waits")
    name = queued.reached(Stage.QUEUED)
    cancel(service, name)
    response = response_of(queued.final())
    assert response.status.code == grpc.StatusCode.CANCELLED.value[0]
    assert response.result.execution_metadata.queued_timestamp.ToNanoseconds() > 0
    cancel(service, running_name)
    assert response_of(running.final()).status.code == grpc.StatusCode.CANCELLED.value[0]


def test_shutdown_ends_unfinished_operations_with_unavailable_in_their_execute_response(
    exec_settings: Settings,
) -> None:
    """UNAVAILABLE ("Due to a transient condition ... The client should retry"), so a client
    such as Bazel retries the action instead of seeing it succeed or fail for good."""
    service = RunningService(exec_settings)
    channel = grpc.insecure_channel(service.address)  # outlives the service's own channel
    closed = False
    try:
        follower = start(service, "sleep 300 # interrupted", channel=channel)
        follower.reached(Stage.EXECUTING)
        service.close()
        closed = True
        response = response_of(follower.final())
        assert response.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert response.result.execution_metadata.worker == exec_settings.server.worker_name
    finally:
        channel.close()
        if not closed:
            service.close()


def test_missing_action_is_failed_precondition_in_the_execute_response(
    exec_service: RunningService,
) -> None:
    missing = Digest.of(b"an action nobody uploaded")
    response = response_of(execute(exec_service.channel, missing).final)
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    failure = error_details_pb2.PreconditionFailure()
    assert response.status.details[0].Unpack(failure)
    assert [v.subject for v in failure.violations] == [missing.subject()]
