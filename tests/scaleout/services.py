"""Real PostgreSQL 15 and BuildGrid 0.9.1 for the scale-out tests and benchmark, each in its own
processes, plus our workers as `sidecar-executor worker` subprocesses.

PostgreSQL runs as the postgres user (it refuses root) on a unix socket only; BuildGrid runs from
its own Python >= 3.13 virtualenv (deploy/local/install-buildgrid.sh), on a loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import grpc
import yaml

from worker.reapi import re_grpc, re_pb2

ROOT = Path(__file__).resolve().parents[2]
BUILDGRID_VENV = ROOT / ".buildgrid" / "venv"
INSTALL_BUILDGRID = ROOT / "deploy" / "local" / "install-buildgrid.sh"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
# BuildGrid forgets a bot this long after its last call (it reaps every 10 s).
KEEPALIVE_S = 10
WORKER_LABEL = "sidecar-executor.worker"


class SetupError(RuntimeError):
    """The scale-out test set-up cannot run here; the message says what is missing."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def _as_postgres(*argv: str, timeout_s: float = 120) -> None:
    result = subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise SetupError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster listening on a unix socket in `socket_dir` only."""

    base: Path

    @property
    def data(self) -> Path:
        return self.base / "pg"

    @property
    def socket_dir(self) -> Path:
        return self.base / "s"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://bgd@/bgd?host={self.socket_dir}"

    def start(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise SetupError(f"PostgreSQL 15 is missing ({PG_BIN}); `make host-test` installs it")
        for directory in (self.data, self.socket_dir):
            directory.mkdir()
            shutil.chown(directory, "postgres", "postgres")
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "bgd", "--auth=trust")
        options = (
            f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c max_connections=200"
        )
        _as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.data / "server.log"),
            "-w",
            "-o",
            options,
            "start",
        )
        _as_postgres(str(PG_BIN / "createdb"), "-h", str(self.socket_dir), "-U", "bgd", "bgd")

    def stop(self) -> None:
        with contextlib.suppress(SetupError, subprocess.TimeoutExpired):
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def query(self, sql: str) -> list[str]:
        result = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-h",
                str(self.socket_dir),
                "-U",
                "bgd",
                "-d",
                "bgd",
                "-At",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return [line for line in result.stdout.splitlines() if line]


# The tags BuildGrid's YAML needs cannot come from yaml.dump; the file is written by hand.
CONFIG_TEMPLATE = """\
server:
  - !channel
    address: "{address}"
    insecure-mode: true
thread-pool-size: 64
connections:
  - !sql-connection &sql
    connection-string: "{database_url}"
    pool-size: 10
    max-overflow: 20
storages:
  - !lru-storage &cas
    size: 2048M
caches:
  - !lru-action-cache &cache
    storage: *cas
    max-cached-refs: 10000
    allow-updates: true
    cache-failed-actions: false
schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas
    action-cache: *cache
    property-set: !dynamic-property-set
      match-property-keys: [OSFamily, ISA, container-image]
    bot-session-keepalive-timeout: {keepalive}
    max-execution-timeout: 600
{assigners}instances:
  - name: ""
    description: scale-out tests
    services:
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
      - !action-cache
        cache: *cache
      - !execution
        scheduler: *scheduler
"""


def ensure_buildgrid() -> Path:
    """The `bgd` of BuildGrid 0.9.1, installed now if missing; SetupError (with the script's
    message, e.g. that no Python >= 3.13 was found) if it cannot be."""
    result = subprocess.run(
        [str(INSTALL_BUILDGRID), str(BUILDGRID_VENV)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise SetupError(f"BuildGrid could not be installed:\n{result.stdout}{result.stderr}")
    return BUILDGRID_VENV / "bin" / "bgd"


# BuildGrid hands queued jobs to bots from assigner threads that look at the queue every
# `interval` + up to `jitter-factor` seconds (1 + 1 by default: about a second per action).
ASSIGNERS_TEMPLATE = """\
    assigners:
      - !priority-age-assigner
        count: 1
        interval: {interval}
        jitter-factor: {interval}
"""
# What the tests use: jobs reach a waiting bot within about 0.1 s.
FAST_ASSIGNER_S = 0.05


class BuildGrid:
    """PostgreSQL and a BuildGrid server on 127.0.0.1:`port`. `assigner_interval_s` None keeps
    BuildGrid's default assigner."""

    def __init__(self, assigner_interval_s: float | None = FAST_ASSIGNER_S) -> None:
        self.assigner_interval_s = assigner_interval_s
        self.bgd = ensure_buildgrid()
        # Short and reachable by the postgres user: the socket path must stay below ~100 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="bgd-", dir="/tmp"))
        self.base.chmod(0o755)
        self.postgres = Postgres(self.base)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"grpc://{self.address}"
        self.log_path = self.base / "buildgrid.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180) -> None:
        self.postgres.start()
        self._bgd("migrate", "apply", self.postgres.url)
        self.config = self.base / "buildgrid.yml"
        self.config.write_text(
            CONFIG_TEMPLATE.format(
                address=self.address,
                database_url=self.postgres.url,
                keepalive=KEEPALIVE_S,
                assigners=""
                if self.assigner_interval_s is None
                else ASSIGNERS_TEMPLATE.format(interval=self.assigner_interval_s),
            )
        )
        self.start_server(timeout_s)

    def start_server(self, timeout_s: float = 180) -> None:
        """Starts the BuildGrid server (again) on the same port and database."""
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [str(self.bgd), "server", "start", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._ready, timeout_s, "BuildGrid to serve", every_s=0.5)

    def stop_server(self) -> None:
        """Stops the BuildGrid server (PostgreSQL and its state stay)."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=30)

    def _bgd(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bgd), *args], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0:
            raise SetupError(f"bgd {' '.join(args)} failed:\n{result.stdout}{result.stderr}")

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise SetupError(f"BuildGrid exited at start:\n{self.log_path.read_text()[-4000:]}")
        with grpc.insecure_channel(self.address) as channel:
            try:
                re_grpc.CapabilitiesStub(channel).GetCapabilities(
                    re_pb2.GetCapabilitiesRequest(instance_name=""), timeout=2
                )
            except grpc.RpcError:
                return False
        return True

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )

    def bot_sessions(self, bot_id: str) -> list[str]:
        """The names of the sessions BuildGrid holds for this bot id."""
        quoted = bot_id.replace("'", "''")
        return self.postgres.query(f"SELECT name FROM bots WHERE bot_id = '{quoted}'")

    def stop(self) -> None:
        self.stop_server()
        self.postgres.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def running_buildgrid(assigner_interval_s: float | None = FAST_ASSIGNER_S) -> Iterator[BuildGrid]:
    grid = BuildGrid(assigner_interval_s)
    try:
        grid.start()
        yield grid
    finally:
        grid.stop()


def worker_config(
    name: str, images: list[str], capacity: int = 2, grace_s: float = 20, **execution: Any
) -> dict[str, Any]:
    return {
        # Health only, on a port of its own (the pod's probes; tests do not ask it).
        "server": {"worker_name": name, "shutdown_grace_s": grace_s, "listen": "127.0.0.1:0"},
        "execution": {
            "max_concurrent_actions": capacity,
            "default_timeout_s": 120,
            "max_timeout_s": 600,
            "daemon_wait_s": 2,
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": capacity},
            "image_pools": {image: {} for image in images},
            **execution,
        },
        "bot": {"keepalive_s": 2, "retry_max_s": 3},
    }


class WorkerProcess:
    """`sidecar-executor worker` in a subprocess, with its own data directory and log."""

    def __init__(self, scheduler: str, data_dir: Path, config: dict[str, Any], *extra: str) -> None:
        self.scheduler = scheduler
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = data_dir.parent / f"{data_dir.name}.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker",
                    "worker",
                    "--scheduler",
                    self.scheduler,
                    "--config",
                    str(self.config_path),
                    "--data-dir",
                    str(self.data_dir),
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        wait_until(
            lambda: self._alive() and self.status().get("state") in ("joining", "running"),
            120,
            f"worker {self.data_dir.name} to start",
        )
        return self

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
        return True

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.data_dir / "bot-status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except FileNotFoundError:
            return ""

    @property
    def worker_id(self) -> str:
        return (self.data_dir / "worker-id").read_text().strip()

    def sidecars(self) -> list[Any]:
        """This worker's sidecar containers (running or not)."""
        client = docker.from_env()
        try:
            return list(
                client.containers.list(
                    all=True, filters={"label": f"{WORKER_LABEL}={self.worker_id}"}
                )
            )
        finally:
            client.close()

    def terminate(self, timeout_s: float = 90) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
                raise
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)


def remove_sidecars_of(worker_id: str) -> None:
    """Clean-up after a test that killed a worker and did not restart it."""
    client = docker.from_env()
    try:
        for container in client.containers.list(
            all=True, filters={"label": f"{WORKER_LABEL}={worker_id}"}
        ):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
    finally:
        client.close()
