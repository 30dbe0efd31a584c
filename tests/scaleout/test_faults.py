"""The lease life cycle under faults, with BuildGrid and real workers: a worker killed mid-action,
a cancel through BuildGrid, a restart on the same data directory, a graceful stop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest

from tests.e2e.bazel import BAZEL, Bazel, BazelRun, make_workspace
from tests.execution_client import (
    execute,
    response_of,
    shell_action,
    start_execute,
    stdout_of,
    upload_action,
)
from tests.images import IMAGE_A
from tests.scaleout.conftest import StartWorker
from tests.scaleout.services import KEEPALIVE_S, BuildGrid, WorkerProcess, wait_until
from worker.reapi import ops_grpc, ops_pb2

pytestmark = [pytest.mark.docker]


def processes_in_sidecars(worker: WorkerProcess) -> list[str]:
    """The command lines running in the worker's sidecars."""
    commands = []
    for container in worker.sidecars():
        try:
            container.reload()
            if container.status != "running":
                continue
            top: dict[str, Any] = container.top(ps_args="-eo pid,args")
        except docker.errors.APIError:  # gone or stopping meanwhile
            continue
        commands += [" ".join(row[1:]) for row in top.get("Processes") or []]
    return commands


def sleeping(worker: WorkerProcess, marker: str) -> bool:
    return any(marker in command for command in processes_in_sidecars(worker))


@pytest.mark.bazel
@pytest.mark.skipif(BAZEL is None, reason="needs Debian's bazel-bootstrap (make test installs it)")
def test_a_worker_killed_mid_action_leaves_it_to_another_and_the_build_succeeds(
    buildgrid: BuildGrid, start_worker: StartWorker, tmp_path: Path
) -> None:
    victim = start_worker("victim", None, 1)
    build = f"""
genrule(
    name = "slow",
    outs = ["slow.txt"],
    cmd = "sleep 8.25; cat /etc/image-name > $@",
    exec_properties = {{"container-image": "docker://{IMAGE_A}"}},
)
"""
    workspace = make_workspace(tmp_path, build)
    bazel = Bazel(workspace, tmp_path / "bazel-root")
    outcome: list[BazelRun] = []
    client = threading.Thread(
        target=lambda: outcome.append(
            bazel.run(
                "build",
                f"--remote_executor={buildgrid.url}",
                "--shell_executable=/bin/sh",
                "--remote_timeout=300",
                "//:slow",
            )
        )
    )
    client.start()
    try:
        wait_until(lambda: sleeping(victim, "sleep 8.25"), 120, "the action to run on the victim")
        rescuer = start_worker("rescuer", None, 1)
        victim.kill()
        client.join(timeout=300)
    finally:
        bazel.shutdown()
    assert not client.is_alive()
    (run,) = outcome
    assert run.returncode == 0, run.output
    assert (workspace / "bazel-bin" / "slow.txt").read_text() == "image-a\n"
    wait_until(lambda: rescuer.status()["leases_completed"] == 1, 30, "the rescuer's report")
    assert victim.status()["leases_completed"] == 0


def test_a_cancel_through_buildgrid_stops_the_running_action(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    worker = start_worker("cancel", None, 1)
    with buildgrid.channel() as channel:
        spec = shell_action("sleep 97.5; echo finished", IMAGE_A, do_not_cache=True)
        stream = start_execute(channel, upload_action(channel, spec), timeout_s=300)
        name = next(iter(stream)).name
        wait_until(lambda: sleeping(worker, "sleep 97.5"), 120, "the action to run")
        ops_grpc.OperationsStub(channel).CancelOperation(
            ops_pb2.CancelOperationRequest(name=name), timeout=30
        )
        wait_until(lambda: not sleeping(worker, "sleep 97.5"), 60, "the action to be stopped")
        wait_until(lambda: worker.status()["running"] == [], 30, "the lease to be dropped")
        operations = list(stream)
        if operations and operations[-1].done:
            assert response_of(operations[-1]).status.code == grpc.StatusCode.CANCELLED.value[0]
        assert "took lease" in worker.log()
        # The worker goes on working.
        after = shell_action("echo after", IMAGE_A, do_not_cache=True)
        response = execute(channel, upload_action(channel, after)).response
        assert response.status.code == 0, response
        assert stdout_of(channel, response) == b"after\n"
    # Only the second lease counts as completed: the cancelled one was never reported.
    wait_until(lambda: worker.status()["leases_completed"] == 1, 30, "the report")
    assert worker.status()["leases_started"] == 2


def test_a_restart_on_the_same_data_dir_replaces_the_session_and_the_leftovers(
    buildgrid: BuildGrid, start_worker: StartWorker, tmp_path: Path
) -> None:
    worker = start_worker("again", None, 1)
    with buildgrid.channel() as channel:
        first = execute(channel, upload_action(channel, shell_action("echo one", IMAGE_A)))
        assert first.response.status.code == 0
        wait_until(lambda: worker.status().get("session"), 30, "a session")
        old_session = worker.status()["session"]
        bot_id = worker.status()["bot_id"]
        old_sidecars = {container.id for container in worker.sidecars()}
        assert len(old_sidecars) == 1
        assert buildgrid.bot_sessions(bot_id) == [old_session]
        worker.kill()  # leaves its sidecar and its session behind

        again = start_worker("again", None, 1, data_dir=worker.data_dir)
        assert again.worker_id == worker.worker_id
        wait_until(
            lambda: buildgrid.bot_sessions(bot_id) not in ([], [old_session]),
            60,
            "the new session",
        )
        (new_session,) = buildgrid.bot_sessions(bot_id)
        assert new_session != old_session
        assert not old_sidecars & {container.id for container in again.sidecars()}
        second = execute(channel, upload_action(channel, shell_action("echo two", IMAGE_A)))
        assert second.response.status.code == 0
        assert stdout_of(channel, second.response) == b"two\n"
        assert len(again.sidecars()) == 1
        sidecar_dirs = list((again.data_dir / "exec" / "sidecars").iterdir())
        assert len(sidecar_dirs) == 1


def test_sigterm_lets_the_running_action_finish_then_exits(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    worker = start_worker("graceful", None, 1)
    with buildgrid.channel() as channel:
        spec = shell_action("sleep 3.25; echo done", IMAGE_A, do_not_cache=True)
        stream = start_execute(channel, upload_action(channel, spec), timeout_s=300)
        wait_until(lambda: sleeping(worker, "sleep 3.25"), 120, "the action to run")
        assert worker.process is not None
        worker.process.send_signal(15)
        operations = list(stream)
        response = response_of(operations[-1])
        assert response.status.code == 0, response
        assert stdout_of(channel, response) == b"done\n"
    assert worker.terminate() == 0
    assert worker.status()["state"] == "stopped"
    assert worker.sidecars() == []


def test_a_worker_rides_out_a_scheduler_restart(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    """BuildGrid goes away for a while and comes back on the same address and database: the
    worker keeps trying (with growing pauses, no crash) and takes work again afterwards."""
    worker = start_worker("patient", None, 1)
    with buildgrid.channel() as channel:
        before = execute(channel, upload_action(channel, shell_action("echo before", IMAGE_A)))
        assert before.response.status.code == 0
    buildgrid.stop_server()
    try:
        wait_until(lambda: worker.status()["state"] == "reconnecting", 60, "the worker to notice")
        wait_until(lambda: worker.log().count("trying again") >= 2, 60, "a second attempt")
    finally:
        buildgrid.start_server()
    with buildgrid.channel() as channel:
        after = execute(channel, upload_action(channel, shell_action("echo after", IMAGE_A)))
        assert after.response.status.code == 0, after.response
        assert stdout_of(channel, after.response) == b"after\n"
    assert worker.process is not None and worker.process.poll() is None


def test_an_action_longer_than_the_session_keepalive_runs_once(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    """BuildGrid forgets a bot KEEPALIVE_S after its last call and requeues its leases; a worker
    busy with one long action keeps calling, so the action is neither requeued nor run twice."""
    worker = start_worker("busy")
    seconds = KEEPALIVE_S + 12  # past the keepalive and a reaper round
    with buildgrid.channel() as channel:
        spec = shell_action(f"sleep {seconds}; echo slept", IMAGE_A, do_not_cache=True)
        execution = execute(channel, upload_action(channel, spec), timeout_s=300)
        assert execution.response.status.code == 0, execution.response
        assert stdout_of(channel, execution.response) == b"slept\n"
    wait_until(lambda: worker.status()["leases_completed"] == 1, 30, "the report")
    assert worker.status()["leases_started"] == 1
    assert worker.status()["sessions"] == 1


def test_sigterm_hands_back_what_outlives_the_grace_period(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    """A lease still running when the grace period ends is reported UNAVAILABLE: BuildGrid
    queues it again at once and another worker runs it; the stopping worker exits cleanly."""
    hurried = start_worker("hurried", None, 1, grace_s=1)
    with buildgrid.channel() as channel:
        spec = shell_action("sleep 6.75; echo complete", IMAGE_A, do_not_cache=True)
        stream = start_execute(channel, upload_action(channel, spec), timeout_s=300)
        wait_until(lambda: sleeping(hurried, "sleep 6.75"), 120, "the action to run")
        other = start_worker("other", None, 1)
        assert hurried.terminate() == 0
        assert hurried.sidecars() == []
        assert "handing it back" in hurried.log()
        response = response_of(list(stream)[-1])
        assert response.status.code == 0, response
        assert stdout_of(channel, response) == b"complete\n"
    wait_until(lambda: other.status()["leases_completed"] == 1, 30, "the other's report")
    assert hurried.status()["leases_completed"] == 0
