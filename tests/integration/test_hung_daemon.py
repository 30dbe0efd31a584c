"""A Docker daemon that stops answering: every call is bounded and the action gets a clear status.

A real daemon cannot be made to hang on one call, so this test serves the few Engine API
endpoints the worker uses from a unix socket of its own and never answers the one under test.
"""

from __future__ import annotations

import io
import json
import socketserver
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest

from tests.execution_client import ActionSpec, run
from tests.serving import running_service
from worker.config import load_settings

IMAGE_ID = "sha256:" + "ab" * 32


class HangingDaemon(socketserver.ThreadingUnixStreamServer):
    """Answers like a healthy daemon except on requests whose path contains `hang_on`."""

    daemon_threads = True

    def __init__(self, path: str, hang_on: str) -> None:
        self.hang_on = hang_on
        # Start-up (daemon ping, the exec-root proof) runs against a healthy daemon; the test
        # arms the hang once the service is up, so only the action's calls meet it.
        self.armed = False
        self.binds: list[str] = []
        self.release = threading.Event()
        self.hung: list[str] = []
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: HangingDaemon
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def _answer(self, status: int, body: object = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _archive(self, wanted: str) -> None:
        """GET .../archive?path=P of the exec-root proof's container: P through its bind
        mount, which is the same path on this host, as a tar of one file."""
        if not any(wanted.startswith(bind.split(":")[0] + "/") for bind in self.server.binds):
            self._answer(404, {"message": f"no such file {wanted}"})
            return
        data = Path(wanted).read_bytes()
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            member = tarfile.TarInfo(Path(wanted).name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        body = archive.getvalue()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        if path.endswith("/containers/create") and body:
            self.server.binds = json.loads(body).get("HostConfig", {}).get("Binds") or []
        if path.endswith("/archive"):
            self._archive(urllib.parse.parse_qs(query)["path"][0])
            return
        if self.server.armed and self.server.hang_on and self.server.hang_on in path:
            self.server.hung.append(path)
            self.server.release.wait(60)
            return
        if path.endswith("/_ping"):
            self._answer(200, "OK")
        elif path.endswith("/version"):
            self._answer(200, {"ApiVersion": "1.41", "Version": "20.10.0"})
        elif path.endswith("/events"):
            self.server.release.wait(60)  # a quiet event stream
        elif path.endswith("/containers/json"):
            self._answer(200, [])
        elif "/images/" in path and path.endswith("/json"):
            self._answer(200, {"Id": IMAGE_ID})
        elif path.endswith("/containers/create"):
            self._answer(201, {"Id": "c" * 64, "Warnings": []})
        elif path.endswith("/start") and "/containers/" in path:
            self._answer(204)
        elif path.endswith("/exec") and "/containers/" in path:
            self._answer(201, {"Id": "e" * 64})
        elif self.command == "DELETE":
            self._answer(204)
        else:
            self._answer(404, {"message": f"no such endpoint {path}"})

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()


@pytest.fixture
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HangingDaemon]:
    server = HangingDaemon(str(tmp_path / "docker.sock"), request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("daemon", "expected"),
    [
        ("/images/", grpc.StatusCode.UNAVAILABLE),  # inspecting the image
        ("/containers/create", grpc.StatusCode.UNAVAILABLE),
        ("/exec", grpc.StatusCode.UNAVAILABLE),  # creating or starting the exec
    ],
    indirect=["daemon"],
)
def test_a_hung_daemon_call_is_bounded_and_reported(
    daemon: HangingDaemon, tmp_path: Path, expected: grpc.StatusCode
) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0", "shutdown_grace_s": 0},
        execution={
            "docker_url": f"unix://{tmp_path / 'docker.sock'}",
            "docker_timeout_s": 2,
            "daemon_wait_s": 0,
            "pull_timeout_s": 2,
            "allowed_images": ["*"],
            # `docker exec` is the daemon call under test in the last case; an agent's sidecar
            # needs a real container, which this stand-in daemon cannot give.
            "pool": {"dispatch": "exec"},
        },
    )
    with running_service(settings) as service:
        daemon.armed = True
        began = time.monotonic()
        response = run(
            service.channel,
            ActionSpec(
                argv=["true"], action_platform={"container-image": "docker://example/hangs:1"}
            ),
        )
        took = time.monotonic() - began
        assert daemon.hung, "the call under test was never made"
        assert response.status.code == expected.value[0], response.status
        assert "timed out" in response.status.message.lower()
        assert took < 20
