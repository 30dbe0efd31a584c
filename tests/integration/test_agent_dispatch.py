"""Dispatch `agent` faults on the real daemon: a stopped or killed agent is noticed, its sidecar
replaced; only the agent the worker started is believed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import grpc
import pytest

from tests.execution_client import (
    response_of,
    run,
    shell_action,
    start_execute,
    upload_action,
)
from tests.images import IMAGE_A
from tests.serving import RunningService, running_service
from worker.config import Settings
from worker.execution.agent_run import connect_agent
from worker.pool.sidecar_pool import SidecarPool
from worker.reapi import ops_pb2
from worker.runner_contract import RUNNER_IN_SIDECAR
from worker.runtime.protocol import ContainerNotRunning

pytestmark = pytest.mark.docker


@pytest.fixture
def agent_service(exec_settings: Settings) -> Iterator[RunningService]:
    pool = exec_settings.execution.pool.model_copy(update={"dispatch": "agent"})
    execution = exec_settings.execution.model_copy(update={"pool": pool})
    with running_service(exec_settings.model_copy(update={"execution": execution})) as service:
        yield service


def only_pool(service: RunningService) -> SidecarPool:
    execution = service.service.execution
    assert execution is not None
    (pool,) = execution.pools.pools
    return pool


def running_in(container_id: str, command: str) -> bool:
    client = docker.APIClient(version="auto")
    try:
        top = client.top(container_id, ps_args="-o pid,args")
    finally:
        client.close()
    return any(args.endswith(command) for _, args in top["Processes"])


def agent_host_pid(container_id: str) -> int:
    """The agent's pid on this host (dockerd shares our pid namespace here)."""
    client = docker.APIClient(version="auto")
    try:
        top = client.top(container_id, ps_args="-o pid,args")
    finally:
        client.close()
    # Its handlers are forks with the same command line (and docker-init's names it after
    # `--`): the agent is the oldest process that is the runner itself.
    agents = [
        int(pid)
        for pid, command in top["Processes"]
        if command.startswith(f"{RUNNER_IN_SIDECAR} agent")
    ]
    assert agents, f"no agent in {top}"
    return min(agents)


@pytest.mark.parametrize("dispatch", ["agent"], indirect=True)
def test_a_stopped_agent_is_given_up_and_the_action_runs_in_a_new_sidecar(
    agent_service: RunningService,
) -> None:
    """A SIGSTOPped agent's socket still accepts connections (the listen backlog); no greeting
    within the deadline gives the sidecar up, and the action runs in another."""
    assert run(agent_service.channel, shell_action("true", IMAGE_A)).status.code == 0
    (sidecar,) = only_pool(agent_service).sidecars
    pid = agent_host_pid(sidecar.container_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        response = run(agent_service.channel, shell_action("echo elsewhere", IMAGE_A))
        assert response.status.code == 0, response.status
        assert time.monotonic() - began < 20
        assert sidecar not in only_pool(agent_service).sidecars
        assert only_pool(agent_service).stats.created == 2
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone with its sidecar, as it should
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("dispatch", ["agent"], indirect=True)
def test_an_agent_killed_mid_action_is_a_lost_runner_and_the_sidecar_is_replaced(
    agent_service: RunningService,
) -> None:
    action = upload_action(
        agent_service.channel, shell_action("echo begun; sleep 60", IMAGE_A, do_not_cache=True)
    )
    stream = start_execute(agent_service.channel, action)
    final: list[ops_pb2.Operation] = []
    reader = threading.Thread(target=lambda: final.extend(stream))
    reader.start()
    execution = agent_service.service.execution
    assert execution is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(p.sidecars for p in execution.pools.pools):
        time.sleep(0.05)
    (sidecar,) = only_pool(agent_service).sidecars
    while time.monotonic() < deadline and not running_in(sidecar.container_id, "sleep 60"):
        time.sleep(0.05)  # the action has reached the agent's handler
    os.kill(agent_host_pid(sidecar.container_id), signal.SIGKILL)
    reader.join(30)
    assert final, "the Execute stream never ended"
    response = response_of(final[-1])
    assert response.status.code == grpc.StatusCode.INTERNAL.value[0], response.status
    assert "the sidecar was replaced" in response.status.message
    after = run(agent_service.channel, shell_action("echo next", IMAGE_A))
    assert after.status.code == 0
    assert only_pool(agent_service).stats.destroyed >= 1


def test_only_the_agent_the_worker_started_is_believed(tmp_path: Path) -> None:
    """A root action could replace the socket with a listener of its own; it cannot know the
    one-time secret the real agent read and deleted at start."""
    path = tmp_path / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def impostor() -> None:
        connection, _ = listener.accept()
        connection.sendall(b"sidecar-agent 1 guessed\n")
        connection.recv(1)
        connection.close()

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    with pytest.raises(ContainerNotRunning, match="not served by its agent"):
        asyncio.run(connect_agent(path, "the-real-secret"))
    thread.join(5)
    listener.close()
