"""Operation names are capabilities, against the real service on loopback.

REAPI v2 `Execute`: the client follows an operation by the name Execute returned ("The operation
can also be queried using Operations API"), "The server NEED NOT implement other methods or
functionality of the Operations API"; `WaitExecution`: "`NOT_FOUND`: The operation no longer
exists due to any of a transient condition, an unknown operation name, or if the server
implements the Operations API DeleteOperation method and it was called for the current
execution". So only a client given a name can follow, cancel or delete that operation: names
are random (UUID4), unknown ones are NOT_FOUND, and nothing on the public port lists them.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable

import grpc
import pytest

from tests.execution_client import execute, shell_action, stage_of, start_execute, upload_action
from tests.images import IMAGE_A
from tests.serving import RunningService
from worker.digests import Digest
from worker.execution.operations import Stage
from worker.reapi import ops_grpc, ops_pb2, re_grpc, re_pb2

pytestmark = pytest.mark.docker


def operations(service: RunningService) -> ops_grpc.OperationsStub:
    return ops_grpc.OperationsStub(service.channel)


def quick_operation(service: RunningService, n: int) -> ops_pb2.Operation:
    """A finished operation with no container involved: its Action is not in the CAS."""
    final = execute(service.channel, Digest.of(f"no such action {n}".encode())).final
    assert final.done
    return final


def assert_code(call: Callable[[], object], code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value


@pytest.mark.parametrize(
    "request_",
    [
        ops_pb2.ListOperationsRequest(),
        ops_pb2.ListOperationsRequest(name="operations", page_size=10),
        ops_pb2.ListOperationsRequest(filter="done=false", page_token="x"),
    ],
)
def test_list_operations_is_refused_on_the_public_port(
    exec_service: RunningService, request_: ops_pb2.ListOperationsRequest
) -> None:
    quick_operation(exec_service, 0)
    error = assert_code(
        lambda: operations(exec_service).ListOperations(request_),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "operator" in (error.details() or "")


def test_operation_names_are_random_uuid4(exec_service: RunningService) -> None:
    names = [quick_operation(exec_service, n).name for n in range(3)]
    assert len(set(names)) == 3
    for name in names:
        prefix, _, rest = name.partition("/")
        assert prefix == "operations"
        assert uuid.UUID(rest).version == 4 and str(uuid.UUID(rest)) == rest


def unknown_names(known: str) -> list[str]:
    flipped = known[:-1] + ("0" if known[-1] != "0" else "1")
    return [f"operations/{uuid.uuid4()}", flipped, "", "operations/", "operations/../x", "*"]


def test_every_method_answers_not_found_for_an_unknown_name(
    exec_service: RunningService,
) -> None:
    known = quick_operation(exec_service, 0).name
    ops = operations(exec_service)
    execution = re_grpc.ExecutionStub(exec_service.channel)
    calls: list[Callable[[str], object]] = [
        lambda name: ops.GetOperation(ops_pb2.GetOperationRequest(name=name)),
        lambda name: ops.CancelOperation(ops_pb2.CancelOperationRequest(name=name)),
        lambda name: ops.DeleteOperation(ops_pb2.DeleteOperationRequest(name=name)),
        lambda name: list(execution.WaitExecution(re_pb2.WaitExecutionRequest(name=name))),
    ]
    for name in unknown_names(known):
        for call in calls:
            assert_code(functools.partial(call, name), grpc.StatusCode.NOT_FOUND)
    # the real name still works, and is gone once deleted
    assert ops.GetOperation(ops_pb2.GetOperationRequest(name=known)).done
    ops.DeleteOperation(ops_pb2.DeleteOperationRequest(name=known))
    assert_code(
        lambda: ops.GetOperation(ops_pb2.GetOperationRequest(name=known)),
        grpc.StatusCode.NOT_FOUND,
    )


def test_only_the_holder_of_a_name_can_cancel_a_running_operation(
    exec_service: RunningService,
) -> None:
    spec = shell_action("sleep 300", IMAGE_A, do_not_cache=True)
    stream = start_execute(exec_service.channel, upload_action(exec_service.channel, spec))
    name = ""
    for operation in stream:
        name = operation.name
        if stage_of(operation) == Stage.EXECUTING:
            break
    rest: list[ops_pb2.Operation] = []
    reader = threading.Thread(target=lambda: rest.extend(stream))
    reader.start()
    ops = operations(exec_service)
    for guess in unknown_names(name):
        request = ops_pb2.CancelOperationRequest(name=guess)
        assert_code(functools.partial(ops.CancelOperation, request), grpc.StatusCode.NOT_FOUND)
    assert not ops.GetOperation(ops_pb2.GetOperationRequest(name=name)).done
    ops.CancelOperation(ops_pb2.CancelOperationRequest(name=name))
    reader.join(30)
    assert rest and rest[-1].done
    response = re_pb2.ExecuteResponse()
    assert rest[-1].response.Unpack(response)
    assert response.status.code == grpc.StatusCode.CANCELLED.value[0]
