"""Execution faults against the real Docker daemon: timeouts, strays, tampering, bad input."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import grpc
import pytest

from tests.execution_client import (
    ActionSpec,
    Execution,
    InputFile,
    execute,
    follow,
    response_of,
    run,
    shell_action,
    stage_of,
    start_execute,
    stdout_of,
    upload_action,
)
from tests.images import IMAGE_A, IMAGE_B
from tests.reapi_client import upload_message
from tests.serving import RunningService, running_service
from worker.config import Settings
from worker.digests import Digest
from worker.execution.operations import Stage
from worker.pool.sidecar_pool import SidecarPool
from worker.reapi import error_details_pb2, ops_grpc, ops_pb2, re_grpc, re_pb2

pytestmark = pytest.mark.docker

A = {"container-image": f"docker://{IMAGE_A}"}


def sh(script: str, **fields: object) -> ActionSpec:
    return shell_action(script, IMAGE_A, **fields)


def only_pool(service: RunningService) -> SidecarPool:
    execution = service.service.execution
    assert execution is not None
    (pool,) = execution.pools.pools
    return pool


def test_timeout_reports_deadline_exceeded_kills_the_tree_and_recycles_the_sidecar(
    exec_service: RunningService,
) -> None:
    spec = sh("echo started; (sleep 300; echo child) & sleep 300", timeout_s=1)
    began = time.monotonic()
    response = run(exec_service.channel, spec)
    assert time.monotonic() - began < 15
    assert response.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    # "If the status code is DEADLINE_EXCEEDED ... the server SHOULD return partial outputs"
    # (stdout so far); the exit code says the action was killed (128 + SIGKILL), never 0.
    assert stdout_of(exec_service.channel, response) == b"started\n"
    assert response.result.exit_code == 137
    pool = only_pool(exec_service)
    assert pool.stats.destroyed == 1  # the timed-out sidecar is not reused
    after = run(exec_service.channel, sh("ps -o comm | grep -c sleep || true"))
    assert (after.status.code, after.result.exit_code) == (0, 0)
    assert stdout_of(exec_service.channel, after) == b"0\n"


def test_process_that_escapes_with_setsid_is_gone_before_the_next_action(
    exec_service: RunningService,
) -> None:
    first = run(exec_service.channel, sh("setsid sleep 300 & setsid sh -c 'sleep 301 &' ; echo ok"))
    assert stdout_of(exec_service.channel, first) == b"ok\n"
    second = run(
        exec_service.channel, sh("ps -o comm,args | grep -v grep | grep -c 'sleep 30' || true")
    )
    assert stdout_of(exec_service.channel, second) == b"0\n"
    pool = only_pool(exec_service)
    assert (pool.stats.created, pool.stats.destroyed) == (1, 0)  # same sidecar, kept


def test_action_cannot_change_an_input_blob_in_the_cas(exec_service: RunningService) -> None:
    original = b"pristine input\n"
    spec = sh(
        "echo tampered >> in.txt; chmod 666 in.txt; echo tampered > in.txt; cat in.txt",
        files={"in.txt": InputFile(original)},
    )
    response = run(exec_service.channel, spec)
    assert stdout_of(exec_service.channel, response) == original
    blobs = exec_service.service.storage.blobs
    assert blobs.read(Digest.of(original)) == original
    assert blobs.blob_path(Digest.of(original)).read_bytes() == original


@pytest.fixture
def root_service(exec_settings: Settings) -> Iterator[RunningService]:
    settings = exec_settings.model_copy(
        update={"execution": exec_settings.execution.model_copy(update={"allow_root": True})}
    )
    with running_service(settings) as running:
        yield running


def test_root_action_can_write_its_inputs_but_not_the_cas(root_service: RunningService) -> None:
    original = b"pristine input\n"
    spec = sh(
        "id -u; echo tampered >> in.txt; cat in.txt",
        files={"in.txt": InputFile(original)},
        action_platform={**A, "dockerRunAsRoot": "true"},
    )
    response = run(root_service.channel, spec)
    assert stdout_of(root_service.channel, response) == b"0\n" + original + b"tampered\n"
    assert root_service.service.storage.blobs.read(Digest.of(original)) == original
    again = run(root_service.channel, sh("cat in.txt", files={"in.txt": InputFile(original)}))
    assert stdout_of(root_service.channel, again) == original


def test_root_is_refused_unless_configured(exec_service: RunningService) -> None:
    response = run(exec_service.channel, sh("id", action_platform={**A, "dockerUser": "0:0"}))
    assert response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]


def test_missing_inputs_are_failed_precondition_with_one_missing_violation_each(
    exec_service: RunningService,
) -> None:
    absent_file = Digest.of(b"never uploaded")
    absent_dir = Digest.of(b"not a directory either")
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="gone.txt", digest=absent_file.to_proto())],
        directories=[re_pb2.DirectoryNode(name="sub", digest=absent_dir.to_proto())],
    )
    command = re_pb2.Command(arguments=["true"])
    action = re_pb2.Action(
        command_digest=upload_message(exec_service.channel, command).to_proto(),
        input_root_digest=upload_message(exec_service.channel, root).to_proto(),
        platform=re_pb2.Platform(
            properties=[re_pb2.Platform.Property(name="container-image", value=IMAGE_A)]
        ),
    )
    response = execute(exec_service.channel, upload_message(exec_service.channel, action)).response
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    failure = error_details_pb2.PreconditionFailure()
    assert response.status.details[0].Unpack(failure)
    assert sorted((v.type, v.subject) for v in failure.violations) == sorted(
        [("MISSING", absent_file.subject()), ("MISSING", absent_dir.subject())]
    )


def test_missing_command_is_a_missing_violation(exec_service: RunningService) -> None:
    absent = Digest.of(b"no such command")
    action = re_pb2.Action(
        command_digest=absent.to_proto(),
        input_root_digest=upload_message(exec_service.channel, re_pb2.Directory()).to_proto(),
    )
    response = execute(exec_service.channel, upload_message(exec_service.channel, action)).response
    failure = error_details_pb2.PreconditionFailure()
    response.status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("MISSING", absent.subject())]


@pytest.mark.parametrize("bad_name", ["a/b", "..", "."])
def test_malformed_input_tree_is_invalid_argument(
    exec_service: RunningService, bad_name: str
) -> None:
    blob = upload_message(exec_service.channel, re_pb2.Directory())  # any stored blob
    root = re_pb2.Directory(files=[re_pb2.FileNode(name=bad_name, digest=blob.to_proto())])
    action = re_pb2.Action(
        command_digest=upload_message(
            exec_service.channel, re_pb2.Command(arguments=["true"])
        ).to_proto(),
        input_root_digest=upload_message(exec_service.channel, root).to_proto(),
        platform=re_pb2.Platform(
            properties=[re_pb2.Platform.Property(name="container-image", value=IMAGE_A)]
        ),
    )
    response = execute(exec_service.channel, upload_message(exec_service.channel, action)).response
    assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert repr(bad_name) in response.status.message


def test_unpullable_image_fails_fast_with_a_clear_precondition(
    exec_service: RunningService,
) -> None:
    began = time.monotonic()
    spec = sh("true", action_platform={"container-image": "docker://registry.invalid/nothing:1"})
    response = run(exec_service.channel, spec)
    assert time.monotonic() - began < 30
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "registry.invalid/nothing:1" in response.status.message
    assert "could not be pulled" in response.status.message
    # Other images are unaffected.
    assert run(exec_service.channel, sh("true")).status.code == 0


def test_image_outside_the_allowlist_is_permission_denied(exec_service: RunningService) -> None:
    spec = sh("true", action_platform={"container-image": "docker://evil/miner:latest"})
    response = run(exec_service.channel, spec)
    assert response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "evil/miner:latest" in response.status.message


def test_unknown_platform_property_is_failed_precondition_naming_it(
    exec_service: RunningService,
) -> None:
    response = run(exec_service.channel, sh("true", action_platform={**A, "gpu-count": "2"}))
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "gpu-count" in response.status.message


def test_action_without_image_and_without_default_is_rejected_clearly(
    exec_service: RunningService,
) -> None:
    response = run(exec_service.channel, sh("true", action_platform={"OSFamily": "Linux"}))
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "container-image" in response.status.message


def test_timeout_above_the_maximum_is_invalid_argument(exec_service: RunningService) -> None:
    response = run(exec_service.channel, sh("true", timeout_s=100_000))
    assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.mark.parametrize(
    ("action_platform", "command_platform", "expected"),
    [
        ({"container-image": IMAGE_B}, None, "image-b"),
        (None, {"container-image": IMAGE_B}, "image-b"),
        ({"container-image": IMAGE_A}, {"container-image": IMAGE_B}, "image-a"),
    ],
    ids=["action-only", "command-only", "conflict-action-wins"],
)
def test_platform_is_read_from_action_then_command(
    exec_service: RunningService,
    action_platform: dict[str, str] | None,
    command_platform: dict[str, str] | None,
    expected: str,
) -> None:
    spec = ActionSpec(
        argv=["cat", "/etc/image-name"],
        action_platform=action_platform,
        command_platform=command_platform,
    )
    response = run(exec_service.channel, spec)
    assert stdout_of(exec_service.channel, response).decode().strip() == expected


def test_cancel_operation_kills_the_running_action(exec_service: RunningService) -> None:
    action = upload_action(exec_service.channel, sh("echo begun; sleep 300", do_not_cache=True))
    stream = start_execute(exec_service.channel, action, timeout_s=60)
    operations: list[ops_pb2.Operation] = []
    executing = threading.Event()

    def consume() -> None:
        for operation in stream:
            operations.append(operation)
            if stage_of(operation) == Stage.EXECUTING:
                executing.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert executing.wait(30)
    time.sleep(0.5)  # let the process start inside the sidecar
    began = time.monotonic()
    ops_grpc.OperationsStub(exec_service.channel).CancelOperation(
        ops_pb2.CancelOperationRequest(name=operations[0].name)
    )
    reader.join(30)
    assert time.monotonic() - began < 10
    final = Execution(operations).final
    assert response_of(final).status.code == grpc.StatusCode.CANCELLED.value[0]
    assert not final.HasField("error")
    got = ops_grpc.OperationsStub(exec_service.channel).GetOperation(
        ops_pb2.GetOperationRequest(name=final.name)
    )
    assert response_of(got).status.code == grpc.StatusCode.CANCELLED.value[0]
    after = run(exec_service.channel, sh("ps -o comm | grep -c sleep || true"))
    assert stdout_of(exec_service.channel, after) == b"0\n"


def test_wait_execution_follows_an_operation_to_its_end(exec_service: RunningService) -> None:
    action = upload_action(exec_service.channel, sh("sleep 1; echo waited", do_not_cache=True))
    stream = start_execute(exec_service.channel, action)
    name = next(iter(stream)).name
    waited = follow(
        re_grpc.ExecutionStub(exec_service.channel).WaitExecution(
            re_pb2.WaitExecutionRequest(name=name)
        )
    )
    assert stdout_of(exec_service.channel, waited.response) == b"waited\n"
    assert waited.final.name == name
    stream.cancel()


def test_wait_execution_of_unknown_operation_is_not_found(exec_service: RunningService) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(
            re_grpc.ExecutionStub(exec_service.channel).WaitExecution(
                re_pb2.WaitExecutionRequest(name="operations/nope")
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_full_queue_is_resource_exhausted(exec_settings: Settings) -> None:
    execution = exec_settings.execution.model_copy(
        update={"max_concurrent_actions": 1, "queue_size": 1}
    )
    settings = exec_settings.model_copy(update={"execution": execution})
    with running_service(settings) as service:
        streams = []
        for i in range(2):
            action = upload_action(service.channel, sh(f"sleep 5 # {i}", do_not_cache=True))
            stream = start_execute(service.channel, action)
            next(iter(stream))
            streams.append(stream)
            time.sleep(0.3)  # the first leaves the queue for the only slot
        third = upload_action(service.channel, sh("true # 3", do_not_cache=True))
        with pytest.raises(grpc.RpcError) as caught:
            execute(service.channel, third)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in streams:
            stream.cancel()


def test_sidecar_killed_from_outside_is_replaced(exec_service: RunningService) -> None:
    assert run(exec_service.channel, sh("true")).status.code == 0
    (sidecar,) = only_pool(exec_service).sidecars
    client = docker.APIClient(version="auto")
    try:
        client.kill(sidecar.container_id)
    finally:
        client.close()
    response = run(exec_service.channel, sh("echo still fine"))
    assert (response.status.code, stdout_of(exec_service.channel, response)) == (
        0,
        b"still fine\n",
    )


def test_leftover_sidecars_of_this_worker_are_removed_at_startup(
    exec_settings: Settings, tmp_path: Path
) -> None:
    with running_service(exec_settings) as service:
        run(service.channel, sh("true"))
        (sidecar,) = only_pool(service).sidecars
        leftover = sidecar.container_id
        execution = service.service.execution
        assert execution is not None
    client = docker.APIClient(version="auto")
    try:
        remaining = [c["Id"] for c in client.containers(all=True)]
    finally:
        client.close()
    assert leftover not in remaining


@pytest.fixture
def memory_limited_service(exec_settings: Settings) -> Iterator[RunningService]:
    pool = exec_settings.execution.pool.model_copy(update={"memory_bytes": 64 * 1024 * 1024})
    execution = exec_settings.execution.model_copy(update={"pool": pool})
    with running_service(exec_settings.model_copy(update={"execution": execution})) as running:
        yield running


def test_oom_kill_is_reported_and_the_sidecar_replaced(
    memory_limited_service: RunningService,
) -> None:
    service = memory_limited_service
    spec = sh("exec dd if=/dev/zero of=/dev/null bs=256M count=1")
    response = run(service.channel, spec)
    assert response.result.exit_code == 137, response
    assert "out-of-memory" in response.message
    pool = only_pool(service)
    assert pool.stats.destroyed == 1
    after = run(service.channel, sh("echo fine"))
    assert stdout_of(service.channel, after) == b"fine\n"


def test_dropping_every_stream_of_an_operation_cancels_it(exec_service: RunningService) -> None:
    action = upload_action(exec_service.channel, sh("sleep 300", do_not_cache=True))
    stream = start_execute(exec_service.channel, action)
    name = ""
    for operation in stream:
        name = operation.name
        if stage_of(operation) == Stage.EXECUTING:
            break
    stream.cancel()
    operations = ops_grpc.OperationsStub(exec_service.channel)
    deadline = time.monotonic() + 30
    state = operations.GetOperation(ops_pb2.GetOperationRequest(name=name))
    while not state.done and time.monotonic() < deadline:
        time.sleep(0.5)
        state = operations.GetOperation(ops_pb2.GetOperationRequest(name=name))
    assert response_of(state).status.code == grpc.StatusCode.CANCELLED.value[0]


def test_output_reached_through_a_symlink_out_of_the_action_is_refused(
    exec_service: RunningService,
) -> None:
    response = run(
        exec_service.channel,
        sh("rm -rf escape && ln -s / escape", output_paths=["escape/etc/image-name"]),
    )
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "through a symlink" in response.status.message
    assert not response.result.output_files


def test_root_action_that_kills_every_process_loses_its_sidecar_which_is_replaced(
    root_service: RunningService,
) -> None:
    killer = sh("kill -9 -1; sleep 5", action_platform={**A, "dockerRunAsRoot": "true"})
    response = run(root_service.channel, killer)
    assert response.status.code == grpc.StatusCode.INTERNAL.value[0], response
    assert "sidecar" in response.status.message
    assert only_pool(root_service).stats.destroyed == 1
    after = run(root_service.channel, sh("echo next"))
    assert stdout_of(root_service.channel, after) == b"next\n"
