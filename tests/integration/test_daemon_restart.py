"""The Docker daemon going away and coming back: a clear UNAVAILABLE, then recovery."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.execution_client import ActionSpec, execute, run, stdout_of, upload_action
from tests.images import IMAGE_A
from tests.reapi_client import bytestream_read, upload_batch
from tests.serving import RunningService, running_service
from worker.config import Settings
from worker.reapi import re_grpc, re_pb2

pytestmark = pytest.mark.docker

ENSURE_DOCKERD = Path(__file__).resolve().parents[2] / "deploy" / "local" / "ensure-dockerd.sh"


def dockerd_pid() -> int | None:
    found = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True)
    pids = found.stdout.split()
    return int(pids[0]) if len(pids) == 1 else None


def stop_dockerd() -> None:
    """SIGTERM to the daemon, then wait until it is gone (ensure-dockerd.sh starts it again)."""
    pid = dockerd_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("pidof") is None or dockerd_pid() is None,
    reason="needs root and a dockerd this test may restart (make test starts one)",
)
def test_daemon_restart_gives_unavailable_then_recovers(exec_service: RunningService) -> None:
    spec = ActionSpec(argv=["echo", "hello"], action_platform={"container-image": IMAGE_A})
    first_action = upload_action(exec_service.channel, spec)
    first = execute(exec_service.channel, first_action).response
    assert stdout_of(exec_service.channel, first) == b"hello\n"
    spec.salt = b"second"  # later runs are new actions, not cache hits

    stop_dockerd()
    try:
        began = time.monotonic()
        down = run(exec_service.channel, spec)
        assert time.monotonic() - began < 30
        assert down.status.code == grpc.StatusCode.UNAVAILABLE.value[0], down.status
        assert "Docker" in down.status.message
        # The CAS and the action cache do not need the daemon: they serve throughout.
        blob = b"served while the daemon is away"
        (digest,) = upload_batch(exec_service.channel, blob)
        assert bytestream_read(exec_service.channel, digest) == blob
        cached = re_grpc.ActionCacheStub(exec_service.channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=first_action.to_proto())
        )
        assert cached.exit_code == 0
    finally:
        subprocess.run([str(ENSURE_DOCKERD)], check=True, timeout=120)

    # The old sidecar died with the daemon; the pool notices and replaces it.
    back = run(exec_service.channel, spec)
    assert (back.status.code, stdout_of(exec_service.channel, back)) == (0, b"hello\n")


@pytest.fixture
def patient_service(exec_settings: Settings) -> Iterator[RunningService]:
    execution = exec_settings.execution.model_copy(update={"daemon_wait_s": 90})
    with running_service(exec_settings.model_copy(update={"execution": execution})) as service:
        yield service


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("pidof") is None or dockerd_pid() is None,
    reason="needs root and a dockerd this test may restart (make test starts one)",
)
def test_daemon_restart_under_load_fails_running_actions_and_runs_waiting_ones(
    patient_service: RunningService,
) -> None:
    """A running action loses its sidecar with the daemon: UNAVAILABLE (retry it). An action
    that arrives while the daemon is away waits for it (execution.daemon_wait_s) and runs."""
    channel = patient_service.channel
    assert run(channel, ActionSpec(argv=["true"], action_platform={"container-image": IMAGE_A}))
    results: dict[str, re_pb2.ExecuteResponse] = {}

    def submit(name: str, argv: list[str]) -> None:
        spec = ActionSpec(
            argv=argv, action_platform={"container-image": IMAGE_A}, salt=name.encode()
        )
        results[name] = run(channel, spec)

    running = threading.Thread(target=submit, args=("running", ["sleep", "60"]))
    running.start()
    time.sleep(2)  # it runs now
    stop_dockerd()
    try:
        waiting = threading.Thread(target=submit, args=("waiting", ["echo", "after"]))
        waiting.start()
        time.sleep(2)  # it waits for the daemon now
    finally:
        subprocess.run([str(ENSURE_DOCKERD)], check=True, timeout=120)
    running.join(120)
    waiting.join(120)
    assert results["running"].status.code == grpc.StatusCode.UNAVAILABLE.value[0], results
    after = results["waiting"]
    assert (after.status.code, stdout_of(channel, after)) == (0, b"after\n")
