"""The fault matrix of docs/RELIABILITY.md, against the real daemon: each fault gets a clear
answer and the service recovers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import grpc
import pytest
import yaml

from tests.execution_client import (
    ActionSpec,
    InputFile,
    execute,
    response_of,
    run,
    shell_action,
    start_execute,
    stdout_of,
    upload_action,
)
from tests.images import IMAGE_A
from tests.reapi_client import write_resource
from tests.serving import RunningService, running_service
from worker.config import Settings, load_settings
from worker.digests import Digest
from worker.identity import ID_FILE
from worker.pool.pools import WORKER_LABEL
from worker.reapi import bs_grpc, bs_pb2

pytestmark = pytest.mark.docker

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def sh(script: str, **fields: object) -> ActionSpec:
    return shell_action(script, IMAGE_A, **fields)


def settings_for(
    data_dir: Path,
    name: str,
    dispatch: str = "exec",
    pool: dict[str, object] | None = None,
    **execution: object,
) -> Settings:
    return load_settings(
        data_dir=data_dir,
        server={"listen": "127.0.0.1:0", "worker_name": name},
        execution={
            "default_timeout_s": 60,
            "max_timeout_s": 120,
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": 2, "dispatch": dispatch, **(pool or {})},
            **execution,
        },
    )


def containers_of(worker_id: str) -> list[str]:
    client = docker.APIClient(version="auto")
    try:
        found = client.containers(all=True, filters={"label": f"{WORKER_LABEL}={worker_id}"})
    finally:
        client.close()
    return [str(c["Id"]) for c in found]


def worker_id_of(data_dir: Path) -> str:
    return (data_dir / ID_FILE).read_text().strip()


def assert_blobs_intact(data_dir: Path) -> None:
    for directory, _, names in os.walk(data_dir / "cas" / "blobs"):
        for name in names:
            data = (Path(directory) / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == name


# --------------------------------------------------------------- two services


def test_two_services_with_one_name_on_one_daemon_leave_each_other_alone(
    tmp_path: Path, test_images: None
) -> None:
    """Same worker_name (as two hosts' default would be), different data directories: neither
    removes the other's sidecars at startup or shutdown."""
    first = settings_for(tmp_path / "a", "same-name")
    second = settings_for(tmp_path / "b", "same-name")
    with running_service(first) as a:
        assert run(a.channel, sh("true")).status.code == 0
        execution = a.service.execution
        assert execution is not None
        (pool,) = execution.pools.pools
        (sidecar,) = pool.sidecars
        with running_service(second) as b:
            assert run(b.channel, sh("true")).status.code == 0
        assert sidecar.container_id in containers_of(a.service.identity.worker_id)
        again = run(a.channel, sh("echo still here"))
        assert stdout_of(a.channel, again) == b"still here\n"
        assert pool.stats.created == 1
    assert worker_id_of(tmp_path / "a") != worker_id_of(tmp_path / "b")


def test_one_data_directory_is_served_by_one_service_at_a_time(
    tmp_path: Path, test_images: None
) -> None:
    settings = settings_for(tmp_path / "d", "w")
    with running_service(settings):
        with pytest.raises(OSError, match="in use by another"):
            running_service(settings).__enter__()
    worker_id = worker_id_of(tmp_path / "d")
    with running_service(settings) as again:
        assert again.service.identity.worker_id == worker_id  # stable across restarts


# ------------------------------------------------------------- process faults


@contextlib.contextmanager
def service_process(config: dict[str, object], tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(config, tmp_path)
    try:
        yield process
    finally:
        process.kill()


class ServiceProcess:
    """`sidecar-executor serve` as its own process, as an operator runs it."""

    def __init__(self, config: dict[str, object], tmp_path: Path) -> None:
        path = tmp_path / f"config-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", "--config", str(path)],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "serving REAPI" not in line:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
        assert "serving REAPI v2 on 127.0.0.1:" in line, line
        self.port = int(line.rsplit(":", 1)[1].split()[0])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def kill(self) -> None:
        """Stops the service as an operator would (SIGTERM: it removes its sidecars), and
        SIGKILLs it only if that does not end it."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()


def process_config(data_dir: Path, dispatch: str, **execution: object) -> dict[str, object]:
    return {
        "data_dir": str(data_dir),
        "server": {"listen": "127.0.0.1:0", "worker_name": "proc", "shutdown_grace_s": 15},
        "execution": {
            "allowed_images": ["sidecar-test/*"],
            "default_timeout_s": 60,
            "pool": {"max_sidecars": 2, "dispatch": dispatch},
            **execution,
        },
    }


def test_sigterm_lets_running_actions_finish_and_ends_queued_ones_unavailable(
    tmp_path: Path, test_images: None, dispatch: str
) -> None:
    config = process_config(tmp_path / "d", dispatch, max_concurrent_actions=1)
    with service_process(config, tmp_path) as service:
        running = start_execute(
            service.channel, upload_action(service.channel, sh("sleep 3; echo finished"))
        )
        first = next(iter(running))
        time.sleep(1)  # running now; the next one waits in the queue
        queued = start_execute(
            service.channel, upload_action(service.channel, sh("echo never", salt=b"q"))
        )
        queued_first = next(iter(queued))
        service.process.send_signal(signal.SIGTERM)
        queued_final = list(queued)[-1]
        assert response_of(queued_final).status.code == UNAVAILABLE
        running_final = list(running)[-1]
        assert running_final.name == first.name and queued_final.name == queued_first.name
        finished = response_of(running_final)
        assert finished.status.code == 0 and finished.result.exit_code == 0
        assert service.process.wait(timeout=60) == 0
    assert containers_of(worker_id_of(tmp_path / "d")) == []
    assert list((tmp_path / "d" / "exec" / "sidecars").iterdir()) == []


def test_sigterm_grace_ends_actions_that_run_longer_unavailable(
    tmp_path: Path, test_images: None, dispatch: str
) -> None:
    config = process_config(tmp_path / "d", dispatch)
    config["server"] = {"listen": "127.0.0.1:0", "shutdown_grace_s": 1}
    with service_process(config, tmp_path) as service:
        long = start_execute(service.channel, upload_action(service.channel, sh("sleep 60")))
        next(iter(long))
        time.sleep(1.5)
        began = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        assert response_of(list(long)[-1]).status.code == UNAVAILABLE
        assert service.process.wait(timeout=60) == 0
        assert time.monotonic() - began < 30
    assert containers_of(worker_id_of(tmp_path / "d")) == []


def test_sigkill_then_restart_removes_leftovers_and_keeps_the_cas(
    tmp_path: Path, test_images: None, dispatch: str
) -> None:
    data_dir = tmp_path / "d"
    config = process_config(data_dir, dispatch)
    with service_process(config, tmp_path) as service:
        response = execute(
            service.channel,
            upload_action(
                service.channel,
                sh("cat in > out", files={"in": InputFile(b"kept\n")}, output_paths=["out"]),
            ),
        ).response
        assert response.status.code == 0
        kept = response.result.output_files[0].digest
        # A partial upload and a running action at the moment of the kill.
        partial = os.urandom(200_000)
        digest = Digest.of(partial)
        first_chunk = bs_pb2.WriteRequest(
            resource_name=write_resource(digest), write_offset=0, data=partial[:1000]
        )
        with contextlib.suppress(grpc.RpcError):  # an unfinished write is the point
            bs_grpc.ByteStreamStub(service.channel).Write(iter([first_chunk]))
        start_execute(service.channel, upload_action(service.channel, sh("sleep 60")))
        time.sleep(1.5)
        worker_id = worker_id_of(data_dir)
        assert containers_of(worker_id) != []
        service.process.kill()
        service.process.wait(timeout=30)
    with service_process(config, tmp_path) as again:
        assert containers_of(worker_id) == []
        assert list((data_dir / "cas" / "tmp").iterdir()) == []
        assert_blobs_intact(data_dir)
        out = execute(
            again.channel,
            upload_action(again.channel, sh("echo back")),
        ).response
        assert stdout_of(again.channel, out) == b"back\n"
        assert (data_dir / "cas" / "blobs" / kept.hash[:2] / kept.hash).read_bytes() == b"kept\n"


# ------------------------------------------------------------ action faults


@pytest.fixture
def limited(tmp_path: Path, test_images: None, dispatch: str) -> Iterator[RunningService]:
    settings = settings_for(
        tmp_path / "d",
        "limited",
        dispatch,
        max_output_bytes=1 << 20,
        pool={"max_sidecars": 1, "pids_limit": 64},
    )
    with running_service(settings) as service:
        yield service


@pytest.mark.parametrize(
    ("script", "outputs"),
    [
        ("head -c 2000000 /dev/zero | tr '\\0' x > big; exit 3", ["big"]),
        ("mkdir d; head -c 700000 /dev/zero > d/a; head -c 700000 /dev/zero > d/b; exit 3", ["d"]),
        ("head -c 2000000 /dev/zero | tr '\\0' y; exit 3", []),
    ],
)
def test_outputs_above_the_limit_are_resource_exhausted_and_the_store_stays_consistent(
    limited: RunningService, script: str, outputs: list[str]
) -> None:
    response = run(limited.channel, sh(script, output_paths=outputs))
    assert response.status.code == RESOURCE_EXHAUSTED, response.status
    assert "max_output_bytes" in response.status.message
    assert response.result.exit_code == 3  # the exit code survives the failed collection
    assert_blobs_intact(limited.service.settings.data_dir)
    blobs = limited.service.settings.data_dir / "cas" / "blobs"
    assert all(p.stat().st_size < 1 << 20 for p in blobs.rglob("*") if p.is_file())
    after = run(limited.channel, sh("echo fine"))
    assert stdout_of(limited.channel, after) == b"fine\n"


def test_fork_bomb_is_held_by_the_pids_limit_and_the_sidecar_recovers(
    limited: RunningService,
) -> None:
    bomb = run(limited.channel, sh("b() { b | b & }; b; sleep 2", timeout_s=3))
    assert bomb.status.code in (0, grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    after = run(limited.channel, sh("echo survived"))
    assert stdout_of(limited.channel, after) == b"survived\n"


def test_a_limit_the_daemon_refuses_is_failed_precondition_not_retryable(
    tmp_path: Path, test_images: None
) -> None:
    """A 4xx from the daemon (here: more CPUs than the machine has) cannot get better by
    retrying: FAILED_PRECONDITION, where UNAVAILABLE would make clients retry forever."""
    settings = settings_for(tmp_path / "d", "refused", pool={"cpus": 4096})
    with running_service(settings) as service:
        response = run(service.channel, sh("true"))
        assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "refused" in response.status.message or "CPU" in response.status.message


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m,nr_inodes=1200", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_while_staging_and_while_collecting_is_resource_exhausted(
    tiny_disk: Path, test_images: None, dispatch: str
) -> None:
    settings = settings_for(tiny_disk / "d", "tiny", dispatch, pool={"max_sidecars": 1})
    with running_service(settings) as service:
        many = {f"f{i}": InputFile(b"") for i in range(1500)}  # more inodes than the disk has
        staged = run(service.channel, sh("true", files=many))
        assert staged.status.code == RESOURCE_EXHAUSTED, staged.status
        # 7 MB written by the action fits; its copy into the CAS does not.
        collected = run(
            service.channel, sh("head -c 7000000 /dev/zero > big", output_paths=["big"])
        )
        assert collected.status.code == RESOURCE_EXHAUSTED, collected.status
        assert_blobs_intact(tiny_disk / "d")
        after = run(service.channel, sh("echo room again"))
        assert stdout_of(service.channel, after) == b"room again\n"
