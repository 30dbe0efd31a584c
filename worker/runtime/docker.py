"""DockerRuntime: the only module that imports docker-py. Blocking; errors translated here."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from worker.runtime.protocol import (
    ContainerGone,
    ContainerNotRunning,
    ExecExitCallback,
    ExecSpec,
    ImageUnavailable,
    RuntimeRejected,
    RuntimeUnavailable,
    SidecarSpec,
)

log = logging.getLogger(__name__)


def _close_socket_on_failed_connect() -> None:
    """docker-py's unix-socket connect() leaks its socket when the daemon is down (the socket
    file is missing), one per call for as long as the daemon is away. Ours closes it."""
    import docker.transport.unixconn as unixconn

    def connect(self: Any) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_socket)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    unixconn.UnixHTTPConnection.connect = connect


_close_socket_on_failed_connect()


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Maps docker-py's errors to ours: 404 gone, 409 not running, other 4xx rejected, the
    rest (5xx, no answer) unavailable."""
    try:
        yield
    except docker.errors.NotFound as error:
        raise ContainerGone(f"{what}: {error.explanation or error}") from error
    except docker.errors.APIError as error:
        if error.status_code == 409:
            raise ContainerNotRunning(f"{what}: {error.explanation or error}") from error
        if error.status_code is not None and 400 <= error.status_code < 500:
            raise RuntimeRejected(f"{what}: {error.explanation or error}") from error
        raise RuntimeUnavailable(f"{what}: {error.explanation or error}") from error
    except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as error:
        raise RuntimeUnavailable(f"{what}: Docker daemon unreachable ({error})") from error


class DockerRuntime:
    """Talks to one Docker daemon over its Engine API socket."""

    def __init__(
        self,
        base_url: str = "unix:///var/run/docker.sock",
        pull_timeout_s: float = 300,
        timeout_s: float = 60,
    ) -> None:
        self._base_url = base_url
        with _translated("connecting to Docker"):
            # Every call but a pull and the event stream is bounded by timeout_s: a hung
            # daemon becomes UNAVAILABLE instead of a hung action.
            self._api = docker.APIClient(
                base_url=base_url, version="auto", timeout=timeout_s, max_pool_size=64
            )
            self._pull_api = docker.APIClient(
                base_url=base_url, version="auto", timeout=pull_timeout_s
            )
        for api in (self._api, self._pull_api):
            # requests would read proxy settings from os.environ on every call: the
            # daemon is local, and that scan showed up in profiles of the hot path.
            api.trust_env = False
        self._events: Any = None
        self._events_lock = threading.Lock()
        self._closed = False

    def ping(self) -> None:
        with _translated("pinging Docker"):
            self._api.ping()

    # ----------------------------------------------------------------- images

    def local_image_id(self, reference: str) -> str | None:
        try:
            with _translated(f"inspecting image {reference}"):
                return str(self._api.inspect_image(reference)["Id"])
        except ContainerGone:
            return None

    def image_volumes(self, image_id: str) -> list[str]:
        with _translated(f"inspecting image {image_id[:19]}"):
            config = self._api.inspect_image(image_id).get("Config") or {}
        return sorted(config.get("Volumes") or {})

    def pull_image(self, reference: str) -> str:
        repository, tag = _split_reference(reference)
        try:
            # stream=False returns the progress text once the pull has ended.
            self._pull_api.pull(repository, tag=tag)
        except docker.errors.APIError as error:
            raise ImageUnavailable(str(error.explanation or error)) from error
        except requests.exceptions.ReadTimeout as error:
            raise ImageUnavailable(f"pull did not finish in time ({error})") from error
        except (requests.exceptions.RequestException, OSError) as error:
            raise RuntimeUnavailable(
                f"pulling {reference}: daemon unreachable ({error})"
            ) from error
        image_id = self.local_image_id(reference)
        if image_id is None:
            raise ImageUnavailable("the pull ended but the image is not present")
        return image_id

    # ------------------------------------------------------------- containers

    def create_sidecar(self, spec: SidecarSpec) -> str:
        host_config = self._api.create_host_config(
            network_mode=spec.network,
            init=True,
            binds={
                m.source: {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
                for m in spec.mounts
            },
            nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
            mem_limit=spec.memory_bytes,
            pids_limit=spec.pids_limit,
            privileged=False,
            security_opt=["no-new-privileges"],
            cap_drop=["ALL"] if spec.capabilities is not None else None,
            cap_add=spec.capabilities or None,
            read_only=spec.read_only_root,
            tmpfs=spec.tmpfs or None,
        )
        with _translated(f"creating a sidecar of {spec.image_id}"):
            created = self._api.create_container(
                spec.image_id,
                command=spec.command,
                entrypoint=spec.entrypoint,
                labels=spec.labels,
                host_config=host_config,
                name=spec.name,
                network_disabled=spec.network == "none",
                user="0:0",
            )
        container_id = str(created["Id"])
        try:
            with _translated(f"starting sidecar {container_id[:12]}"):
                self._api.start(container_id)
        except Exception:
            self.remove_container(container_id)
            raise
        return container_id

    def remove_container(self, container_id: str) -> None:
        try:
            with _translated(f"removing container {container_id[:12]}"):
                self._api.remove_container(container_id, force=True, v=True)
        except ContainerGone:
            pass
        except ContainerNotRunning:
            pass  # 409: a removal of it is already in progress

    def is_running(self, container_id: str) -> bool:
        try:
            with _translated(f"inspecting container {container_id[:12]}"):
                return bool(self._api.inspect_container(container_id)["State"]["Running"])
        except ContainerGone:
            return False

    def containers_with_label(self, label: str, value: str) -> list[str]:
        with _translated("listing containers"):
            found = self._api.containers(all=True, filters={"label": f"{label}={value}"})
        return [str(c["Id"]) for c in found]

    # ------------------------------------------------------------------ execs

    def start_exec(self, container_id: str, spec: ExecSpec) -> str:
        with _translated(f"exec in sidecar {container_id[:12]}"):
            created = self._api.exec_create(
                container_id,
                spec.argv,
                stdout=False,
                stderr=False,
                environment=[f"{k}={v}" for k, v in spec.env.items()],
                user=spec.user,
                workdir=spec.workdir or None,
            )
            exec_id = str(created["Id"])
            self._api.exec_start(exec_id, detach=True)
        return exec_id

    def exec_exit_code(self, exec_id: str) -> int | None:
        with _translated(f"inspecting exec {exec_id[:12]}"):
            state = self._api.exec_inspect(exec_id)
        if state.get("Running"):
            return None
        code = state.get("ExitCode")
        return int(code) if code is not None else None

    def wait_exec_events(self, on_exit: ExecExitCallback) -> None:
        with _translated("following Docker events"):
            stream = self._api.events(
                filters={"type": "container", "event": "exec_die"}, decode=True
            )
            with self._events_lock:
                if self._closed:
                    stream.close()
                    return
                self._events = stream
            try:
                for event in stream:
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    exec_id, code = attributes.get("execID"), attributes.get("exitCode")
                    if exec_id and code is not None:
                        on_exit(str(exec_id), int(code))
            finally:
                with self._events_lock:
                    self._events = None
                with contextlib.suppress(Exception):
                    stream.close()
        if not self._closed:
            raise RuntimeUnavailable("the Docker event stream ended")

    def close(self) -> None:
        with self._events_lock:
            self._closed = True
            if self._events is not None:
                with contextlib.suppress(Exception):
                    self._events.close()
        self._api.close()
        self._pull_api.close()


def _split_reference(reference: str) -> tuple[str, str | None]:
    """'name:tag' -> ('name', 'tag'); 'name@sha256:…' stays whole; a registry port is not a tag."""
    if "@" in reference:
        return reference, None
    name, sep, tag = reference.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return reference, "latest"
