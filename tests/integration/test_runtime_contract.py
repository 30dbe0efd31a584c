"""One contract, two runtimes: what worker/runtime/protocol.py promises, checked against the
FakeContainerRuntime and against DockerRuntime on the real daemon, so the fake the unit tests
rely on behaves like the real thing where the worker can tell.

Sidecars are made as SidecarPools.spec_for makes them (the runner mounted read-only, only their
own directory mounted at the same path, the runner's capabilities, a read-only root with tmpfs
scratch) and actions run through the real runner as the worker runs it, minus `scrub` and
`exclusive`, which the fake must never apply to this host (worker/runtime/fake.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest

from tests.images import IMAGE_A
from worker.config import load_settings
from worker.execution.wiring import DEFAULT_RUNNER, prepare_exec_root
from worker.pool.pools import WORKER_LABEL, SidecarPools
from worker.pool.sidecar_pool import PoolKey
from worker.runner_contract import (
    INPUT_ROOT,
    REPORT,
    RUNNER_DIR_IN_SIDECAR,
    STDOUT,
    ActionDir,
    RunnerReport,
    RunRequest,
    cancel_argv,
    parse_report,
)
from worker.runtime.docker import DockerRuntime
from worker.runtime.fake import FakeContainerRuntime
from worker.runtime.protocol import (
    ContainerGone,
    ContainerNotRunning,
    ContainerRuntime,
    ExecSpec,
    ImageUnavailable,
    RuntimeRejected,
    SidecarSpec,
)

pytestmark = pytest.mark.skipif(
    not DEFAULT_RUNNER.exists(), reason="run `make` to build the runner"
)

NOBODY = 65534
ABSENT = "sidecar-test/absent:1"
UNPULLABLE = "registry.invalid/nothing:1"


@dataclass
class Rig:
    """A runtime, an image it has, and directories laid out as the worker lays them out."""

    runtime: ContainerRuntime
    kind: str
    image_id: str
    worker_id: str
    sidecars: Path
    runner_dir: Path
    events: list[tuple[str, int]] = field(default_factory=list)
    _events_thread: threading.Thread | None = None

    def spec(self, **changes: Any) -> tuple[SidecarSpec, Path]:
        """The spec SidecarPools.spec_for builds for a non-root pool (with `changes`), and
        the sidecar's own directory."""
        directory = self.sidecars / uuid.uuid4().hex[:16]
        os.mkdir(directory, 0o755)
        pools = SidecarPools(
            runtime=self.runtime,
            settings=load_settings(data_dir=self.sidecars.parent).execution,
            worker_id=self.worker_id,
            worker_name="runtime-contract",
            sidecars_dir=self.sidecars,
            runner_dir=self.runner_dir,
            limiter=anyio.CapacityLimiter(1),
        )
        key = PoolKey(self.image_id, f"{NOBODY}:{NOBODY}", "none", None, None, 4096)
        return dataclasses.replace(pools.spec_for(key, directory), **changes), directory

    def sidecar(self) -> tuple[str, Path]:
        spec, directory = self.spec()
        return self.runtime.create_sidecar(spec), directory

    def follow_events(self, container_id: str, directory: Path) -> None:
        """Follows exit events, once they are seen to flow (the daemon reports only what
        happens after its stream is open)."""

        def follow() -> None:
            self.runtime.wait_exec_events(lambda exec_id, code: self.events.append((exec_id, code)))

        self._events_thread = threading.Thread(target=follow, daemon=True)
        self._events_thread.start()
        for _ in range(50):
            action, request = staged_action(directory, "true")
            probe = self.runtime.start_exec(container_id, run_spec(action, request))
            with contextlib.suppress(AssertionError):
                event_for(self, probe, within_s=0.5)
                return
        raise AssertionError("no exit event came")

    def stop_main_process(self, container_id: str) -> None:
        """The sidecar's main process dies (the container stops but is not removed)."""
        if isinstance(self.runtime, FakeContainerRuntime):
            self.runtime.stop(container_id)
            return
        client = docker.APIClient(version="auto")
        try:
            client.kill(container_id)
            client.wait(container_id, timeout=10)
        finally:
            client.close()


def staged_action(
    directory: Path, script: str, timeout_ms: int = 20_000
) -> tuple[ActionDir, RunRequest]:
    """An action directory as stage_action leaves it (root-owned action and control
    directories, the input root given to the action's user) and the runner request for it."""
    action = ActionDir.new(directory)
    os.mkdir(action.path, 0o755)
    os.mkdir(action.control, 0o700)
    for place in (action.input_root, action.home, action.tmp):
        os.mkdir(place, 0o755)
        os.chown(place, NOBODY, NOBODY)
    request = RunRequest(
        control_dir=action.control,
        uid=NOBODY,
        gid=NOBODY,
        timeout_ms=timeout_ms,
        working_dir=action.path / INPUT_ROOT,
        argv=("/bin/sh", "-c", script),
        scrub=False,
        exclusive=False,
    )
    return action, request


def run_spec(action: ActionDir, request: RunRequest) -> ExecSpec:
    return ExecSpec(
        request.runner_argv(),
        env={"HOME": str(action.home), "TMPDIR": str(action.tmp)},
        user="0:0",
    )


def exit_code_of(runtime: ContainerRuntime, exec_id: str, within_s: float = 20) -> int:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        code = runtime.exec_exit_code(exec_id)
        if code is not None:
            return code
        time.sleep(0.02)
    raise AssertionError(f"exec {exec_id[:12]} did not end within {within_s} s")


def event_for(rig: Rig, exec_id: str, within_s: float = 20) -> int:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for seen, code in list(rig.events):
            if seen == exec_id:
                return code
        time.sleep(0.02)
    raise AssertionError(f"no exit event for exec {exec_id[:12]} within {within_s} s")


def running_with(marker: str) -> bool:
    """Whether a live process of this host (containers' included) has `marker` in its argv."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                stat = (entry / "stat").read_text()
                if stat.rpartition(")")[2].split()[0] != "Z":
                    return True
        except OSError:
            continue
    return False


def report_of(action: ActionDir) -> RunnerReport | None:
    return parse_report((action.control / REPORT).read_text())


def wait_for_file(path: Path, within_s: float = 20) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} stayed empty")


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.docker)])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Removes, at the end, only the containers labelled with this test's own worker id."""
    base = Path(tempfile.mkdtemp(prefix="runtime-contract-"))
    base.chmod(0o755)  # the action's user must reach its directory
    layout = prepare_exec_root(base / "exec", DEFAULT_RUNNER)
    runtime: ContainerRuntime
    if request.param == "docker":
        request.getfixturevalue("test_images")
        runtime = DockerRuntime()
        image_id = runtime.local_image_id(IMAGE_A)
        assert image_id is not None
    else:
        fake = FakeContainerRuntime()
        image_id = fake.add_image(IMAGE_A)
        runtime = fake
    worker_id = f"contract-{uuid.uuid4().hex}"
    rig = Rig(runtime, request.param, image_id, worker_id, layout.sidecars, layout.runner)
    try:
        yield rig
    finally:
        try:
            for container_id in runtime.containers_with_label(WORKER_LABEL, worker_id):
                runtime.remove_container(container_id)
        finally:
            runtime.close()
            if rig._events_thread is not None:
                rig._events_thread.join(10)
            shutil.rmtree(base)


# ------------------------------------------------------------------- images


def test_local_image_id_of_present_and_absent_images(rig: Rig) -> None:
    rig.runtime.ping()
    assert rig.runtime.local_image_id(IMAGE_A) == rig.image_id
    assert rig.image_id.startswith("sha256:")
    assert rig.runtime.local_image_id(rig.image_id) == rig.image_id  # an ID names itself
    assert rig.runtime.local_image_id(ABSENT) is None


def test_pull_of_an_unavailable_image_is_image_unavailable(rig: Rig) -> None:
    with pytest.raises(ImageUnavailable):
        rig.runtime.pull_image(UNPULLABLE)


# --------------------------------------------------------------- containers


def test_a_sidecar_runs_and_is_found_by_its_label(rig: Rig) -> None:
    container_id, _ = rig.sidecar()
    assert rig.runtime.is_running(container_id)
    assert rig.runtime.containers_with_label(WORKER_LABEL, rig.worker_id) == [container_id]
    assert rig.runtime.containers_with_label(WORKER_LABEL, f"{rig.worker_id}-other") == []


def test_remove_container_is_idempotent_and_the_container_is_gone(rig: Rig) -> None:
    container_id, directory = rig.sidecar()
    rig.runtime.remove_container(container_id)
    rig.runtime.remove_container(container_id)
    assert not rig.runtime.is_running(container_id)
    assert rig.runtime.containers_with_label(WORKER_LABEL, rig.worker_id) == []
    _, request = staged_action(directory, "true")
    with pytest.raises(ContainerGone):
        rig.runtime.start_exec(container_id, ExecSpec(request.runner_argv(), user="0:0"))
    assert directory.is_dir()  # a bind mount's source outlives its container


def test_create_of_an_unknown_image_is_container_gone(rig: Rig) -> None:
    spec, _ = rig.spec(image_id="sha256:" + "0" * 64)
    with pytest.raises(ContainerGone):
        rig.runtime.create_sidecar(spec)
    assert rig.runtime.containers_with_label(WORKER_LABEL, rig.worker_id) == []


def test_create_with_an_invalid_limit_is_rejected(rig: Rig) -> None:
    spec, _ = rig.spec(memory_bytes=1024 * 1024)  # below the daemon's 6 MB minimum
    with pytest.raises(RuntimeRejected):
        rig.runtime.create_sidecar(spec)


# -------------------------------------------------------------------- execs


def test_runner_runs_an_action_and_its_exit_code_is_inspected(rig: Rig) -> None:
    container_id, directory = rig.sidecar()
    action, request = staged_action(directory, "echo hi; id -u; pwd; exit 3")
    exec_id = rig.runtime.start_exec(container_id, run_spec(action, request))
    assert exit_code_of(rig.runtime, exec_id) == 3
    assert report_of(action) == RunnerReport("exited", 3, 0, 0, 0, scrubbed=False)
    assert (action.control / STDOUT).read_text() == f"hi\n{NOBODY}\n{action.input_root}\n"
    assert rig.runtime.is_running(container_id)  # the sidecar outlives its actions


def test_exit_codes_come_as_events(rig: Rig) -> None:
    container_id, directory = rig.sidecar()
    rig.follow_events(container_id, directory)
    codes = {}
    for code in (0, 7):
        action, request = staged_action(directory, f"exit {code}")
        codes[rig.runtime.start_exec(container_id, run_spec(action, request))] = code
    for exec_id, code in codes.items():
        assert event_for(rig, exec_id) == code
        assert rig.runtime.exec_exit_code(exec_id) == code


def test_a_timed_out_action_is_reported_by_the_runner(rig: Rig) -> None:
    container_id, directory = rig.sidecar()
    action, request = staged_action(directory, "sleep 30", timeout_ms=300)
    exec_id = rig.runtime.start_exec(container_id, run_spec(action, request))
    assert exit_code_of(rig.runtime, exec_id) == 124
    report = report_of(action)
    assert report is not None and report.outcome == "timeout"


def test_cancel_ends_a_running_action(rig: Rig) -> None:
    container_id, directory = rig.sidecar()
    action, request = staged_action(directory, "echo started; sleep 30")
    exec_id = rig.runtime.start_exec(container_id, run_spec(action, request))
    wait_for_file(action.control / STDOUT)
    cancel = rig.runtime.start_exec(container_id, ExecSpec(cancel_argv(action.control), user="0:0"))
    assert exit_code_of(rig.runtime, cancel) == 0
    assert exit_code_of(rig.runtime, exec_id) == 128 + 15
    report = report_of(action)
    assert report is not None and (report.outcome, report.code) == ("cancelled", 15)


def test_removing_a_sidecar_kills_its_running_exec(rig: Rig) -> None:
    container_id, directory = rig.sidecar()
    rig.follow_events(container_id, directory)
    marker = f"{30 + random.random():.6f}"  # a sleep no one else runs
    action, request = staged_action(directory, f"echo started; sleep {marker}; true")
    exec_id = rig.runtime.start_exec(container_id, run_spec(action, request))
    wait_for_file(action.control / STDOUT)
    assert running_with(marker)
    rig.runtime.remove_container(container_id)
    assert event_for(rig, exec_id) == 137
    assert not running_with(marker)
    assert not (action.control / REPORT).exists()  # the runner died with its container
    with pytest.raises(ContainerGone):
        rig.runtime.exec_exit_code(exec_id)


def test_exec_in_a_stopped_sidecar_is_container_not_running(rig: Rig) -> None:
    container_id, directory = rig.sidecar()
    rig.stop_main_process(container_id)
    assert not rig.runtime.is_running(container_id)
    action, request = staged_action(directory, "true")
    with pytest.raises(ContainerNotRunning):
        rig.runtime.start_exec(container_id, run_spec(action, request))
    assert rig.runtime.containers_with_label(WORKER_LABEL, rig.worker_id) == [container_id]


def test_exec_of_a_missing_program_is_rejected(rig: Rig) -> None:
    container_id, _ = rig.sidecar()
    with pytest.raises(RuntimeRejected):
        rig.runtime.start_exec(
            container_id, ExecSpec([f"{RUNNER_DIR_IN_SIDECAR}/missing", "run"], user="0:0")
        )


def test_exec_of_an_unknown_exec_is_container_gone(rig: Rig) -> None:
    with pytest.raises(ContainerGone):
        rig.runtime.exec_exit_code("0" * 64)


# ------------------------------------------------------------ the fake only


@pytest.mark.parametrize("rig", ["fake"], indirect=True)
def test_the_fake_never_lets_the_runner_scrub_this_host(rig: Rig) -> None:
    """On this host `scrub` would empty /tmp and `exclusive` would kill every process of the
    uid: the fake drops both from the runner's argv (checked on the running runner, which is
    then killed before it could scrub anything), and reports a requested scrub as done, as a
    fresh sidecar's runner would."""
    assert isinstance(rig.runtime, FakeContainerRuntime)
    container_id, directory = rig.sidecar()
    action, request = staged_action(directory, "echo started; sleep 30")
    request = dataclasses.replace(request, scrub=True, exclusive=True)
    rig.runtime.start_exec(container_id, run_spec(action, request))
    wait_for_file(action.control / STDOUT)
    runner_pid = int((action.control / "pid").read_text())
    argv = Path(f"/proc/{runner_pid}/cmdline").read_bytes().split(b"\0")
    assert argv[7] == b"-" and argv[1] == b"run"
    rig.runtime.remove_container(container_id)
    assert rig.runtime.started[-1][7] == "scrub,exclusive"  # what the worker asked for

    container_id, directory = rig.sidecar()
    action, request = staged_action(directory, "true")
    exec_id = rig.runtime.start_exec(
        container_id, run_spec(action, dataclasses.replace(request, scrub=True))
    )
    assert exit_code_of(rig.runtime, exec_id) == 0
    assert report_of(action) == RunnerReport("exited", 0, 0, 0, 0, scrubbed=True)
