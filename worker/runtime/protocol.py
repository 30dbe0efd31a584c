"""What the sidecar pool and executor need from a container runtime, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class SidecarSpec:
    """How to create one sidecar container."""

    image_id: str
    entrypoint: list[str]
    command: list[str]
    mounts: list[Mount]
    labels: dict[str, str]
    network: str = "none"
    cpus: float | None = None
    memory_bytes: int | None = None
    pids_limit: int | None = None
    name: str | None = None
    # None keeps the runtime's default capability set; a list keeps only those.
    capabilities: list[str] | None = None
    read_only_root: bool = False
    tmpfs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecSpec:
    """One process to start inside a running sidecar."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = ""


class ContainerRuntime(Protocol):
    """Blocking calls; the async callers run them in worker threads.

    Errors: ContainerGone (404), ContainerNotRunning (409), RuntimeRejected (any other 4xx:
    the request itself is wrong, retrying cannot help), ImageUnavailable,
    RuntimeUnavailable (daemon unreachable or 5xx). Every sidecar runs with
    no-new-privileges and never privileged.
    """

    def ping(self) -> None: ...

    def read_shared_file(self, path: str) -> bytes:
        """The host file `path` as the daemon's containers see it when its directory is
        bind-mounted at the same path (proof that worker and daemon share the exec root);
        ContainerGone when the daemon's side of that path does not hold it."""
        ...

    def local_image_id(self, reference: str) -> str | None: ...

    def pull_image(self, reference: str) -> str: ...

    def image_volumes(self, image_id: str) -> list[str]:
        """The paths the image declares as VOLUMEs (each sidecar would get a fresh writable
        volume there unless the spec says otherwise)."""
        ...

    def create_sidecar(self, spec: SidecarSpec) -> str: ...

    def remove_container(self, container_id: str) -> None: ...

    def is_running(self, container_id: str) -> bool: ...

    def containers_with_label(self, label: str, value: str) -> list[str]: ...

    def start_exec(self, container_id: str, spec: ExecSpec) -> str: ...

    def exec_exit_code(self, exec_id: str) -> int | None:
        """None while the exec still runs."""
        ...

    def wait_exec_events(self, on_exit: ExecExitCallback) -> None:
        """Blocks, calling on_exit(exec_id, exit_code) for every exec that ends, until the
        event stream breaks (then it raises RuntimeUnavailable) or close() is called."""
        ...

    def close(self) -> None: ...


class ExecExitCallback(Protocol):
    def __call__(self, exec_id: str, exit_code: int) -> None: ...


class ContainerRuntimeError(Exception):
    """Base of runtime failures."""


class ContainerGone(ContainerRuntimeError):
    """The container does not exist (any more)."""


class ContainerNotRunning(ContainerRuntimeError):
    """The container exists but is stopped."""


class RuntimeRejected(ContainerRuntimeError):
    """The daemon refused the request as invalid (a bad limit or mount, say)."""


class ImageUnavailable(ContainerRuntimeError):
    """The image is not local and could not be pulled."""


class RuntimeUnavailable(ContainerRuntimeError):
    """The daemon cannot be reached, or failed on its side."""
