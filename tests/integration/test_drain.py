"""Drain on SIGTERM, every clause at once, against `sidecar-executor serve` as its own process
with real actions in flight: new executions are refused UNAVAILABLE, running ones finish within
server.shutdown_grace_s, the rest end with a status that says so, the sidecars go, exit 0."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.execution_client import (
    response_of,
    shell_action,
    stage_of,
    start_execute,
    stdout_of,
    upload_action,
)
from tests.images import IMAGE_A
from tests.integration.test_fault_matrix import (
    containers_of,
    process_config,
    service_process,
    worker_id_of,
)
from worker.reapi import ops_pb2, re_grpc, re_pb2

pytestmark = pytest.mark.docker

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
GRACE_S = 8
EXECUTING = re_pb2.ExecutionStage.EXECUTING


def wait_until(condition: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def until_executing(stream: Iterator[ops_pb2.Operation]) -> ops_pb2.Operation:
    """Reads an Execute stream up to the update that says the action is executing."""
    operation = next(stream)
    while stage_of(operation) != EXECUTING:
        operation = next(stream)
    return operation


def serving(channel: grpc.Channel) -> bool:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def test_sigterm_drains_finishes_what_fits_in_the_grace_and_reports_the_rest(
    tmp_path: Path, test_images: None, dispatch: str
) -> None:
    data_dir = tmp_path / "d"
    config = process_config(data_dir, dispatch, max_concurrent_actions=2)
    config["server"] = {"listen": "127.0.0.1:0", "shutdown_grace_s": GRACE_S}
    with service_process(config, tmp_path) as service:
        channel = service.channel
        cached = upload_action(channel, shell_action("echo cached", IMAGE_A))
        list(start_execute(channel, cached))  # its result is in the action cache now
        short_action = upload_action(channel, shell_action("sleep 2; echo finished", IMAGE_A))
        long_action = upload_action(channel, shell_action("sleep 600", IMAGE_A))
        short, long = start_execute(channel, short_action), start_execute(channel, long_action)
        until_executing(short)
        long_first = until_executing(long)
        # both sidecars exist, so both actions are about to run or running
        wait_until(lambda: len(containers_of(worker_id_of(data_dir))) == 2)
        queued = start_execute(channel, upload_action(channel, shell_action("true", IMAGE_A)))
        assert stage_of(next(queued)) == re_pb2.ExecutionStage.QUEUED  # both slots are busy

        service.process.send_signal(signal.SIGTERM)
        wait_until(lambda: not serving(channel))
        # Draining: the port still answers, so clients are told to go elsewhere, not left
        # hanging; a result already cached is no exception.
        for digest in (upload_action(channel, shell_action("echo new", IMAGE_A)), cached):
            with pytest.raises(grpc.RpcError) as refused:
                next(start_execute(channel, digest))
            assert refused.value.code() == UNAVAILABLE
            assert "shutting down" in str(refused.value.details())
        # A client that reconnects to a running operation may still follow it.
        waiting = re_grpc.ExecutionStub(channel).WaitExecution(
            re_pb2.WaitExecutionRequest(name=long_first.name), timeout=120
        )

        not_started = response_of(list(queued)[-1])
        assert not_started.status.code == UNAVAILABLE.value[0]
        assert "had not started" in not_started.status.message
        finished = response_of(list(short)[-1])
        assert finished.status.code == 0 and finished.result.exit_code == 0
        cut_short = [response_of(list(long)[-1]), response_of(list(waiting)[-1])]
        for response in cut_short:
            assert response.status.code == UNAVAILABLE.value[0]
            assert f"{GRACE_S} s" in response.status.message
            assert "server.shutdown_grace_s" in response.status.message
        assert service.process.wait(timeout=120) == 0
    log = "".join(service.log)
    assert "1 actions still running after" in log
    report = log.split("still running after", 1)[1].splitlines()[0]
    assert str(long_action) in report and str(short_action) not in report
    assert containers_of(worker_id_of(data_dir)) == []
    assert list((data_dir / "exec" / "sidecars").iterdir()) == []
    with service_process(config, tmp_path) as again:  # the finished action's output was kept
        assert stdout_of(again.channel, finished) == b"finished\n"
