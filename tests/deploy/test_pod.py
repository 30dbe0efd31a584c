"""The worker pod of deploy/kubernetes, built from deploy/ and run as Kubernetes would run it
(tests/deploy/pod.py says how, and which flag stands in for `privileged`), driven by real
Bazel 4.2.3 from inside the pod's network namespace."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from grpc_health.v1 import health_pb2

from tests.deploy.pod import PodImages, SimulatedPod, pod_images
from tests.e2e import bazel as bazel_module
from tests.e2e.bazel import BAZEL, Bazel, BazelRun, make_workspace
from tests.images import IMAGE_A
from worker.app import LIVENESS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.bazel,
    pytest.mark.skipif(
        BAZEL is None, reason="needs Debian's bazel-bootstrap (make test installs it)"
    ),
]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The test's changes to the manifest's configuration: its images, a quicker health check.
CONFIG_CHANGES = {
    "execution": {"allowed_images": ["sidecar-test/*"]},
    "health": {"check_interval_s": 1},
}

CHAIN = (
    'genrule(name = "chained", srcs = [":t0", "input.txt"], outs = ["chained.txt"],'
    ' cmd = "cat $(SRCS) > $@")\n'
)


@pytest.fixture(scope="module")
def images() -> PodImages:
    return pod_images()


@pytest.fixture
def pod(images: PodImages, reachable_dir: Path) -> Iterator[SimulatedPod]:
    made = SimulatedPod(images, reachable_dir / "pod", CONFIG_CHANGES)
    try:
        yield made
    finally:
        made.close()


def eventually(condition: Callable[[], bool], what: str, within_s: float = 120) -> None:
    """A generous bound: only something that never happens fails."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def ready_pod(pod: SimulatedPod) -> None:
    pod.start_pause()
    pod.start_dind()
    pod.wait_for_daemon()
    pod.load_image(IMAGE_A)
    pod.start_worker()
    channel = pod.channel()
    eventually(lambda: pod.health(channel) == SERVING, "the worker never became ready")
    channel.close()


def bazel_in(pod: SimulatedPod, root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Bazel's client and server run in the pod's network namespace (they see only its
    loopback, where the REAPI port is), with the host's files."""
    wrapper = root / "bazel-in-pod"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(pod.netns())} {BAZEL} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(bazel_module, "BAZEL", str(wrapper))
    return wrapper


def build(
    pod: SimulatedPod, workspace: Path, output_root: Path, *flags: str
) -> tuple[BazelRun, Bazel]:
    client = Bazel(workspace, output_root)
    run = client.run(
        "build",
        f"--remote_executor=grpc://127.0.0.1:{pod.reapi_port}",
        # The manifest's port takes clients with a bearer token from the pod's Secret.
        f"--remote_header=Authorization=Bearer {pod.token}",
        f"--remote_default_exec_properties=container-image=docker://{IMAGE_A}",
        "--shell_executable=/bin/sh",
        *flags,
        "//:all",
    )
    return run, client


def genrules(count: int, script: str) -> str:
    return "".join(
        f'genrule(name = "t{i}", outs = ["t{i}.txt"], cmd = "{script.format(i=i)} > $@")\n'
        for i in range(count)
    )


def sidecars_running(pod: SimulatedPod) -> int:
    return sum(1 for c in pod.daemon_containers() if c["State"] == "running")


def running_in_sidecars(pod: SimulatedPod, command: str) -> bool:
    """Whether a process whose command line holds `command` runs in one of the sidecars."""
    client = pod.daemon()
    try:
        for found in client.containers():
            with contextlib.suppress(docker.errors.APIError):
                processes = client.top(found["Id"])["Processes"] or []
                if any(command in " ".join(p) for p in processes):
                    return True
        return False
    finally:
        client.close()


@pytest.mark.timeout(2400)  # the first run builds the images (about 2 minutes here)
def test_pod_starts_in_any_order_listens_only_on_reapi_and_builds_with_bazel(
    pod: SimulatedPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod.start_pause()
    pod.start_worker()  # before its daemon, as the kubelet may start them
    channel = pod.channel()
    eventually(lambda: pod.health(channel, LIVENESS) == SERVING, "the worker never served")
    assert pod.health(channel) == NOT_SERVING
    assert "waiting for the Docker daemon" in pod.logs("worker")

    pod.start_dind()
    pod.wait_for_daemon()
    pod.load_image(IMAGE_A)
    eventually(lambda: pod.health(channel) == SERVING, "the worker never became ready")
    state = pod.state("worker")
    assert state["Running"] and state["RestartCount"] == 0, state
    assert "Traceback" not in pod.logs("worker")
    assert "shares the exec root" in pod.logs("worker")
    assert pod.listening_tcp_ports() == {pod.reapi_port}

    workspace = make_workspace(
        tmp_path, genrules(3, "(cat /etc/image-name; echo {i})") + CHAIN, {"input.txt": "source\n"}
    )
    bazel_in(pod, tmp_path, monkeypatch)
    run, client = build(pod, workspace, tmp_path / "bazel")
    try:
        assert run.returncode == 0, run.output
        assert run.process_counts().get("remote") == 4, run.output
    finally:
        client.shutdown()
    assert (workspace / "bazel-bin" / "t2.txt").read_text() == "image-a\n2\n"
    assert (workspace / "bazel-bin" / "chained.txt").read_text() == "image-a\n0\nsource\n"
    channel.close()


def test_a_daemon_that_sees_the_exec_root_elsewhere_stops_the_worker_with_the_setting_named(
    pod: SimulatedPod, reachable_dir: Path
) -> None:
    pod.start_pause()
    pod.start_dind()
    pod.wait_for_daemon()
    # The worker's data volume at /elsewhere, the daemon's at /data: paths that differ.
    elsewhere = reachable_dir / "elsewhere"
    elsewhere.mkdir()
    pod.start_worker(
        "misplaced",
        moved={"data": "/elsewhere"},
        sources={"data": elsewhere},
        environment={
            "SIDECAR_EXECUTOR_DATA_DIR": "/elsewhere",
            "SIDECAR_EXECUTOR_EXECUTION__EXEC_ROOT": "/elsewhere/exec",
        },
    )
    assert pod.wait_exit("misplaced", timeout_s=120) == 1
    last = pod.logs("misplaced").strip().splitlines()[-1]
    assert "does not see the exec root /elsewhere/exec" in last, last
    assert "execution.exec_root" in last and "same path" in last, last
    assert "Traceback" not in pod.logs("misplaced")


def test_pod_survives_its_daemon_restarting_under_load_and_leaks_no_containers(
    pod: SimulatedPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready_pod(pod)
    workspace = make_workspace(tmp_path, genrules(6, "sleep 3; echo {i}"))
    bazel_in(pod, tmp_path, monkeypatch)
    result: list[tuple[BazelRun, Bazel]] = []
    builder = threading.Thread(
        target=lambda: result.append(build(pod, workspace, tmp_path / "bazel", "--jobs=6"))
    )
    builder.start()
    try:
        eventually(lambda: sidecars_running(pod) > 0, "no sidecar ever ran")
        time.sleep(1)  # actions are running in it now
        pod.docker.restart(pod.container("dind"), timeout=5)
        pod.wait_for_daemon()
        pod.load_image(IMAGE_A)
    finally:
        builder.join(timeout=600)
    ((run, client),) = result
    try:
        assert run.returncode == 0, run.output
    finally:
        client.shutdown()
    for i in range(6):
        assert (workspace / "bazel-bin" / f"t{i}.txt").read_text() == f"{i}\n"
    state = pod.state("worker")
    assert state["Running"] and state["RestartCount"] == 0, state
    channel = pod.channel()
    eventually(lambda: pod.health(channel) == SERVING, "the worker never became ready again")
    channel.close()
    # What the restart stopped is removed; what is left is the pool's own live sidecars.
    eventually(
        lambda: all(c["State"] == "running" for c in pod.daemon_containers()),
        "stopped containers were left on the pod's daemon",
    )
    assert len(pod.daemon_containers()) <= pod.config["execution"]["max_sidecars_total"]

    pod.docker.kill(pod.container("worker"), signal="SIGTERM")
    assert pod.wait_exit("worker", timeout_s=120) == 0
    assert pod.daemon_containers() == []


def test_sigterm_drains_running_actions_and_the_daemon_waits_for_the_worker(
    pod: SimulatedPod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready_pod(pod)
    workspace = make_workspace(tmp_path, genrules(1, "sleep 6; echo {i}"))
    bazel_in(pod, tmp_path, monkeypatch)
    result: list[tuple[BazelRun, Bazel]] = []
    builder = threading.Thread(
        target=lambda: result.append(
            # Outputs stay remote: the worker stops serving once its last action is done.
            build(pod, workspace, tmp_path / "bazel", "--remote_download_minimal")
        )
    )
    builder.start()
    try:
        eventually(lambda: running_in_sidecars(pod, "sleep 6"), "the action never started")
        # Kubernetes: both preStop hooks start; the worker's SIGTERM follows its 5 s sleep
        # (left out here), the daemon's only when its hook, waiting for the worker, ends.
        dind_pre_stop = subprocess.Popen(
            ["docker", "exec", pod.container("dind"), "flock", "/data/.lock", "true"]
        )
        pod.docker.kill(pod.container("worker"), signal="SIGTERM")
        time.sleep(1)
        assert pod.state("worker")["Running"], "the worker did not wait for its action"
        assert dind_pre_stop.poll() is None, "the daemon's preStop did not wait for the worker"
        assert pod.wait_exit("worker", timeout_s=120) == 0
        assert dind_pre_stop.wait(timeout=60) == 0
    finally:
        builder.join(timeout=600)
    ((run, client),) = result
    try:
        assert run.returncode == 0, run.output
        assert run.process_counts().get("remote") == 1, run.output
    finally:
        client.shutdown()
    assert pod.daemon_containers() == [], "the worker left sidecars behind"
    assert "Traceback" not in pod.logs("worker")
