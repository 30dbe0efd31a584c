"""Start-up that explains itself, and gRPC health that follows the daemon and the exec root.

The worker here talks to the real Docker daemon through a socket this test owns
(DaemonProxy), so "the daemon goes away" is a closed proxy, never a stopped daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.daemon_proxy import DaemonProxy
from tests.execution_client import run, shell_action, stdout_of
from tests.images import IMAGE_A
from tests.reapi_client import upload_batch
from worker.app import LIVENESS, Service
from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.config import Settings, load_settings
from worker.execution.startup import StartupFailed, probe_dir
from worker.execution.wiring import ExecutionSide
from worker.runtime.docker import DockerRuntime
from worker.runtime.fake import FakeContainerRuntime
from worker.runtime.protocol import ContainerGone, RuntimeUnavailable

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXECUTION = "build.bazel.remote.execution.v2.Execution"
CAS = "build.bazel.remote.execution.v2.ContentAddressableStorage"


def worker_settings(base: Path, docker_url: str) -> Settings:
    return load_settings(
        data_dir=base / "data",
        server={"listen": "127.0.0.1:0", "worker_name": "startup"},
        execution={
            "docker_url": docker_url,
            "allowed_images": ["sidecar-test/*"],
            "daemon_wait_s": 2,
            "pool": {"max_sidecars": 1},
        },
        health={"startup_backoff_max_s": 0.2, "check_interval_s": 0.2},
    )


class BackgroundService:
    """A Service whose start() runs in the background, so a test can watch it start."""

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.service: Service = self._call(self._create(settings))
        self.started: Future[None] = asyncio.run_coroutine_threadsafe(
            self.service.start(), self._loop
        )
        deadline = time.monotonic() + 30
        while self.service.port == 0 and not self.started.done():
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.service.port}")

    @staticmethod
    async def _create(settings: Settings) -> Service:
        return Service(settings)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def health(self, name: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status)

    def admin_health(self, name: str) -> int:
        """The same health, asked on the admin socket (what an operator's tools see)."""
        with grpc.insecure_channel(self.service.settings.admin_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=name)
            return int(stub.Check(request, timeout=10).status)

    def wait_for(self, name: str, status: int, within_s: float = 60) -> None:
        """Generous bound: only a status that never comes fails the test."""
        deadline = time.monotonic() + within_s
        while self.health(name) != status:
            assert time.monotonic() < deadline, f"health of {name!r} never became {status}"
            time.sleep(0.05)

    def close(self) -> None:
        self.channel.close()
        if self.started.done() and self.started.exception() is None:
            self._call(self.service.stop(grace_s=1))
        else:
            self.started.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[DaemonProxy]:
    proxy = DaemonProxy(tmp_path / "docker.sock")
    yield proxy
    proxy.down()


@pytest.fixture
def background(
    reachable_dir: Path, proxy: DaemonProxy, test_images: None
) -> Iterator[Callable[[], BackgroundService]]:
    made: list[BackgroundService] = []

    def make() -> BackgroundService:
        made.append(BackgroundService(worker_settings(reachable_dir, proxy.url)))
        return made[-1]

    yield make
    for service in made:
        service.close()


def echo(service: BackgroundService, text: str) -> bytes:
    response = run(service.channel, shell_action(f"echo {text}", IMAGE_A))
    assert response.status.code == 0, response.status
    return stdout_of(service.channel, response)


def test_runtime_does_not_contact_the_daemon_until_used(tmp_path: Path) -> None:
    runtime = DockerRuntime(f"unix://{tmp_path}/absent.sock")
    with pytest.raises(RuntimeUnavailable):
        runtime.ping()
    runtime.close()


@pytest.mark.docker
def test_worker_started_before_its_daemon_waits_not_serving_then_becomes_ready(
    background: Callable[[], BackgroundService], proxy: DaemonProxy
) -> None:
    service = background()
    assert service.health(LIVENESS) == SERVING
    assert service.health("") == NOT_SERVING
    assert service.health(EXECUTION) == NOT_SERVING
    assert service.health(CAS) == SERVING
    upload_batch(service.channel, b"the cache serves while execution waits")
    assert not service.started.done()

    proxy.up()
    service.started.result(timeout=60)
    assert service.health("") == SERVING
    assert service.health(EXECUTION) == SERVING
    assert echo(service, "after-the-wait") == b"after-the-wait\n"


@pytest.mark.docker
def test_health_is_not_serving_while_the_daemon_is_away_and_serving_after(
    background: Callable[[], BackgroundService], proxy: DaemonProxy
) -> None:
    proxy.up()
    service = background()
    service.started.result(timeout=60)
    assert echo(service, "before") == b"before\n"

    proxy.down()
    service.wait_for("", NOT_SERVING)
    assert service.health(EXECUTION) == NOT_SERVING
    assert service.health(LIVENESS) == SERVING
    assert service.admin_health("") == NOT_SERVING

    proxy.up()
    service.wait_for("", SERVING)
    assert service.health(EXECUTION) == SERVING
    assert service.admin_health("") == SERVING
    assert echo(service, "after") == b"after\n"


@pytest.mark.docker
def test_health_is_not_serving_while_the_exec_root_is_unusable(
    background: Callable[[], BackgroundService], proxy: DaemonProxy
) -> None:
    proxy.up()
    service = background()
    service.started.result(timeout=60)
    probes = probe_dir(service.service.settings.exec_root)
    probes.rmdir()
    probes.write_text("a file where the worker needs a directory")
    try:
        service.wait_for("", NOT_SERVING)
    finally:
        probes.unlink()
    service.wait_for("", SERVING)
    assert echo(service, "usable") == b"usable\n"


class DaemonWithItsOwnFilesystem(FakeContainerRuntime):
    """A daemon whose containers do not see the worker's exec root (another mount path)."""

    def read_shared_file(self, path: str) -> bytes:
        raise ContainerGone(f"Could not find the file {path} in container 0123")


def test_start_up_stops_naming_the_setting_when_the_daemon_sees_another_exec_root(
    reachable_dir: Path,
) -> None:
    settings = worker_settings(reachable_dir, "unix:///var/run/dind/docker.sock")
    store = DiskBlobStore(settings.data_dir / "cas", 1 << 30)
    side = ExecutionSide(
        settings,
        "startup",
        "0" * 32,
        store,
        DiskActionCache(settings.data_dir / "action-cache", store),
        runtime=DaemonWithItsOwnFilesystem(),
    )

    async def start() -> None:
        try:
            await side.start()
        finally:
            await side.close()
            store.close()

    with pytest.raises(StartupFailed) as failure:
        asyncio.run(start())
    message = str(failure.value)
    assert "execution.exec_root" in message
    assert str(settings.exec_root) in message
    assert "same path" in message
    assert list(probe_dir(settings.exec_root).iterdir()) == [], "the nonce was left behind"


def serve(tmp_path: Path, **health: float) -> subprocess.Popen[str]:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "server": {"listen": "127.0.0.1:0"},
                "execution": {"docker_url": f"unix://{tmp_path}/no-daemon.sock"},
                "health": {"startup_backoff_max_s": 0.2, **health},
            }
        )
    )
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_serve_gives_up_on_an_absent_daemon_with_the_settings_named(tmp_path: Path) -> None:
    process = serve(tmp_path, startup_wait_s=1)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("sidecar-executor: no Docker daemon answered"), stderr
    assert "execution.docker_url" in last and "health.startup_wait_s" in last
    assert "Traceback" not in stderr


def test_serve_stops_cleanly_on_sigterm_while_it_waits_for_the_daemon(tmp_path: Path) -> None:
    process = serve(tmp_path)
    assert process.stderr is not None
    for line in process.stderr:
        if "waiting for the Docker daemon" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "stopped before execution was ready" in stderr
    assert "Traceback" not in stderr
