"""The Docker daemon going away and coming back: a clear UNAVAILABLE, then recovery."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.execution_client import ActionSpec, execute, run, stdout_of, upload_action
from tests.images import IMAGE_A
from tests.reapi_client import bytestream_read, upload_batch
from tests.serving import RunningService
from worker.reapi import re_grpc, re_pb2

pytestmark = pytest.mark.docker

ENSURE_DOCKERD = Path(__file__).resolve().parents[2] / "deploy" / "local" / "ensure-dockerd.sh"


def dockerd_pid() -> int | None:
    found = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True)
    pids = found.stdout.split()
    return int(pids[0]) if len(pids) == 1 else None


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

    pid = dockerd_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
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
