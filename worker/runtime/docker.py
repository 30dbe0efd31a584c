"""DockerRuntime: the only module that imports docker-py. Blocking; errors translated here."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import tarfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from worker.runtime.protocol import (
    ContainerGone,
    ContainerNotRunning,
    ContainerRuntimeError,
    ExecExitCallback,
    ExecSpec,
    ImageUnavailable,
    RuntimeRejected,
    RuntimeUnavailable,
    SidecarSpec,
)

log = logging.getLogger(__name__)

# An empty image the daemon imports once, for the container that reads the exec root's probe
# file; its containers are labelled so a leftover one is recognisable.
PROBE_IMAGE = "sidecar-executor/exec-root-probe:1"
PROBE_LABEL = "sidecar-executor.probe"
# A random value per creation, so a container whose creation seemed to fail can be found.
CREATION_LABEL = "sidecar-executor.creation"


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
        # Nothing here talks to the daemon: in a pod the worker may start before its daemon,
        # and the start-up code waits for it (worker/execution/startup.py). The clients are
        # made on first use, when the API version can be negotiated.
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._pull_timeout_s = pull_timeout_s
        self._clients: tuple[Any, Any] | None = None
        self._clients_lock = threading.Lock()
        self._events: Any = None
        self._events_lock = threading.Lock()
        self._closed = False
        # Creations that failed and may have left a container behind, by creation label.
        self._failed_creations: set[str] = set()

    def _connect(self) -> tuple[Any, Any]:
        with self._clients_lock:
            if self._clients is None:
                with _translated(f"connecting to Docker at {self._base_url}"):
                    # Every call but a pull and the event stream is bounded by timeout_s: a
                    # hung daemon becomes UNAVAILABLE instead of a hung action.
                    api = docker.APIClient(
                        base_url=self._base_url,
                        version="auto",
                        timeout=self._timeout_s,
                        max_pool_size=64,
                    )
                    pull_api = docker.APIClient(
                        base_url=self._base_url,
                        version=api.api_version,
                        timeout=self._pull_timeout_s,
                    )
                for client in (api, pull_api):
                    # requests would read proxy settings from os.environ on every call: the
                    # daemon is local, and that scan showed up in profiles of the hot path.
                    client.trust_env = False
                self._clients = (api, pull_api)
            return self._clients

    @property
    def _api(self) -> Any:
        return (self._clients or self._connect())[0]

    @property
    def _pull_api(self) -> Any:
        return (self._clients or self._connect())[1]

    def ping(self) -> None:
        with _translated("pinging Docker"):
            self._api.ping()
        self.remove_failed_creations()

    def read_shared_file(self, path: str) -> bytes:
        """Reads `path` through the daemon: a container that bind-mounts its directory at the
        same path is created (never started) and the file is copied out of it. ContainerGone
        when the daemon's side of that path does not hold the file."""
        directory, _, name = path.rpartition("/")
        image = self._probe_image()
        host_config = self._api.create_host_config(
            binds={directory: {"bind": directory, "mode": "ro"}}, network_mode="none"
        )
        try:
            with _translated("creating the exec-root probe container"):
                created = self._api.create_container(
                    image,
                    command=["/none"],
                    host_config=host_config,
                    network_disabled=True,
                    labels={PROBE_LABEL: "1"},
                )
        except ContainerGone as error:  # the probe image went missing: not the file's absence
            raise RuntimeRejected(str(error)) from error
        container_id = str(created["Id"])
        try:
            with _translated(f"reading {path} through Docker"):
                stream, _ = self._api.get_archive(container_id, path)
                archive = b"".join(stream)
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                member = tar.extractfile(name)
                if member is None:
                    raise ContainerGone(f"{path} is not a regular file on the daemon's side")
                return member.read()
        finally:
            self.remove_container(container_id)

    def _probe_image(self) -> str:
        """An image with nothing in it, imported on the daemon (no registry needed)."""
        if self.local_image_id(PROBE_IMAGE) is None:
            repository, tag = PROBE_IMAGE.rsplit(":", 1)
            empty = io.BytesIO()
            tarfile.open(fileobj=empty, mode="w").close()
            with _translated("importing the exec-root probe image"):
                self._api.import_image_from_data(empty.getvalue(), repository=repository, tag=tag)
        return PROBE_IMAGE

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
        self.remove_failed_creations()
        token = uuid.uuid4().hex
        try:
            with _translated(f"creating a sidecar of {spec.image_id}"):
                created = self._api.create_container(
                    spec.image_id,
                    command=spec.command,
                    entrypoint=spec.entrypoint,
                    labels={**spec.labels, CREATION_LABEL: token},
                    host_config=host_config,
                    name=spec.name,
                    network_disabled=spec.network == "none",
                    user="0:0",
                )
        except RuntimeUnavailable:
            # The daemon may have made the container and lost the answer (it was stopping).
            self._failed_creations.add(token)
            raise
        container_id = str(created["Id"])
        try:
            with _translated(f"starting sidecar {container_id[:12]}"):
                self._api.start(container_id)
        except Exception:
            try:
                self.remove_container(container_id)
            except ContainerRuntimeError:
                self._failed_creations.add(token)
            raise
        return container_id

    def remove_failed_creations(self) -> None:
        """Removes the containers of creations that failed while the daemon was going away
        (nobody else knows their IDs). Cheap when there are none; kept for later when the
        daemon still cannot be asked."""
        for token in list(self._failed_creations):
            try:
                with _translated("listing containers of failed creations"):
                    found = self._api.containers(
                        all=True, filters={"label": f"{CREATION_LABEL}={token}"}
                    )
                for container in found:
                    self.remove_container(str(container["Id"]))
            except ContainerRuntimeError:
                return
            self._failed_creations.discard(token)
            if found:
                log.info("removed a sidecar whose creation had failed: %s", found[0]["Id"][:12])

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
        with self._clients_lock:
            for client in self._clients or ():
                client.close()


def _split_reference(reference: str) -> tuple[str, str | None]:
    """'name:tag' -> ('name', 'tag'); 'name@sha256:…' stays whole; a registry port is not a tag."""
    if "@" in reference:
        return reference, None
    name, sep, tag = reference.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return reference, "latest"
