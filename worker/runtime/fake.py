"""FakeContainerRuntime: the ContainerRuntime Protocol without a daemon, for fast tests of
failure paths (in the way httpx ships MockTransport beside its real transports).

Nothing is mocked: containers are records, images a dict, and an exec of the sidecar runner
runs the real runner as a local process on this machine, as root, so the executor, the runner
driver and the pools see real exit codes, reports, outputs and timeouts. Knobs inject the
faults a real daemon produces: a call that fails once, a call that hangs, a container that
vanishes or stops, an event stream that breaks. tests/integration/test_runtime_contract.py
runs one suite against this class and against DockerRuntime, so both keep the same contract.

What differs from a container, and why:
- An exec runs on this host, not in an image's filesystem. Its argv[0] is mapped through the
  container's mounts (so /.sidecar-executor/sidecar-runner becomes the runner the sidecar
  mounts); every other path is used as is, which is right for the worker's sidecars because
  their own directory is mounted at the same path. Only the runner's `run` and `cancel` may
  be exec'd: anything else would run as root on this machine, so it is refused.
- The runner's `scrub` and `exclusive` options are removed from its argv before it starts.
  On this host `scrub` would empty this machine's /tmp, /var/tmp, /dev/shm and SysV IPC, and
  `exclusive` would kill every process of the action's uid here. A fake sidecar has no
  scratch places of its own to empty, so when `scrub` was asked for the fake rewrites the
  report's `scrubbed=0` to `scrubbed=1` after the runner ends, as the runner would report in
  a fresh sidecar. The options the worker asked for stay visible in `started`.
- Removing a container (or `vanish`) kills its execs' whole process trees; their exits are
  reported with code 137 and the execs are forgotten (inspecting them is ContainerGone), as
  Docker does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from worker.runner_contract import REPORT, RUNNER_IN_SIDECAR
from worker.runtime.protocol import (
    ContainerGone,
    ContainerNotRunning,
    ContainerRuntime,
    ContainerRuntimeError,
    ExecExitCallback,
    ExecSpec,
    ImageUnavailable,
    RuntimeRejected,
    RuntimeUnavailable,
    SidecarSpec,
)

# Every method of the Protocol: the names fail_next and hang accept.
METHODS = frozenset(name for name in vars(ContainerRuntime) if not name.startswith("_"))

# Docker's PATH for an image that sets none; the image's environment is under the exec's.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker refuses a memory limit below this (the contract test checks both agree).
MIN_MEMORY_BYTES = 6 * 1024 * 1024

# Position of OPTIONS in `sidecar-runner run CONTROL UID GID TIMEOUT_MS WORKDIR OPTIONS -- ...`.
_OPTIONS_AT = 7
_HOST_ONLY_UNSAFE = ("scrub", "exclusive")


@dataclass
class FakeContainer:
    id: str
    spec: SidecarSpec
    running: bool = True


@dataclass
class FakeExec:
    container_id: str
    argv: list[str]  # as the caller asked, options included
    process: subprocess.Popen[bytes]
    scrub_asked: bool
    exit_code: int | None = None
    killed: bool = False
    watcher: threading.Thread | None = field(default=None, repr=False)
    # Signals go through a pidfd, which can never reach another process that reused the PID;
    # it is closed (under `signalling`) once the process is reaped.
    pidfd: int = -1
    signalling: threading.Lock = field(default_factory=threading.Lock, repr=False)


class FakeContainerRuntime:
    """A ContainerRuntime whose "daemon" is this object. Thread-safe, like the real one.

    `images` maps references to image IDs already present; `pullable` those a pull may fetch.
    `calls` counts every call of every method (failed ones too); `started` lists the argv of
    every exec started, as asked.
    """

    def __init__(
        self,
        images: dict[str, str] | None = None,
        pullable: dict[str, str] | None = None,
    ) -> None:
        self.images: dict[str, str] = dict(images or {})
        self.pullable: dict[str, str] = dict(pullable or {})
        # VOLUME paths an image declares, by image ID (tests set them).
        self.volumes: dict[str, list[str]] = {}
        self.calls: Counter[str] = Counter()
        self.started: list[list[str]] = []
        self._containers: dict[str, FakeContainer] = {}
        self._execs: dict[str, FakeExec] = {}
        self._running: list[FakeExec] = []
        self._failures: dict[str, list[ContainerRuntimeError]] = {}
        self._hangs: dict[str, list[float]] = {}
        self._events: list[tuple[str, int]] = []
        self._streams_ended = 0
        self._lock = threading.Condition()
        self._closing = threading.Event()

    # ------------------------------------------------------------------ knobs

    @staticmethod
    def image_id_for(reference: str) -> str:
        return "sha256:" + hashlib.sha256(reference.encode()).hexdigest()

    def add_image(self, reference: str) -> str:
        """Makes `reference` a local image; returns its ID."""
        with self._lock:
            self.images[reference] = self.image_id_for(reference)
            return self.images[reference]

    def allow_pull(self, reference: str) -> str:
        """Lets a pull of `reference` succeed (pulls of anything else raise ImageUnavailable);
        returns the ID the image will have."""
        with self._lock:
            self.pullable[reference] = self.image_id_for(reference)
            return self.pullable[reference]

    def fail_next(self, method: str, error: ContainerRuntimeError, times: int = 1) -> None:
        """The next `times` calls of `method` raise `error` without doing anything."""
        self._check(method)
        with self._lock:
            self._failures.setdefault(method, []).extend([error] * times)

    def hang(self, method: str, seconds: float, times: int = 1) -> None:
        """The next `times` calls of `method` block for `seconds` first (close() ends the wait).
        With fail_next on the same method, that is a daemon timing out: a wait, then an error."""
        self._check(method)
        with self._lock:
            self._hangs.setdefault(method, []).extend([seconds] * times)

    def vanish(self, container_id: str) -> None:
        """The container disappears behind the worker's back (removed by someone else, the
        daemon lost it): its execs are killed, and later calls about it find nothing (404)."""
        self._drop(container_id)

    def stop(self, container_id: str) -> None:
        """The container stops (its main process died): its execs are killed, is_running is
        False and start_exec raises ContainerNotRunning (409), until it is removed."""
        with self._lock:
            container = self._containers.get(container_id)
            if container is None:
                raise ContainerGone(f"no such container: {container_id}")
            container.running = False
            doomed = [e for e in self._running if e.container_id == container_id]
        self._kill(doomed)

    def end_event_streams(self) -> None:
        """The daemon restarts: every wait_exec_events in progress raises RuntimeUnavailable."""
        with self._lock:
            self._streams_ended += 1
            self._lock.notify_all()

    @property
    def containers(self) -> dict[str, FakeContainer]:
        """The containers that exist now, by ID."""
        with self._lock:
            return dict(self._containers)

    # ---------------------------------------------------------------- protocol

    def ping(self) -> None:
        self._enter("ping")

    def read_shared_file(self, path: str) -> bytes:
        """The fake's sidecars run on this host, so they see its files as they are."""
        self._enter("read_shared_file")
        try:
            return Path(path).read_bytes()
        except FileNotFoundError as error:
            raise ContainerGone(f"Could not find the file {path}") from error

    def local_image_id(self, reference: str) -> str | None:
        self._enter("local_image_id")
        with self._lock:
            if reference in self.images.values():
                return reference
            return self.images.get(reference)

    def image_volumes(self, image_id: str) -> list[str]:
        self._enter("image_volumes")
        with self._lock:
            return sorted(self.volumes.get(image_id, []))

    def pull_image(self, reference: str) -> str:
        self._enter("pull_image")
        with self._lock:
            image_id = self.pullable.get(reference)
            if image_id is None:
                raise ImageUnavailable(f"pull access denied for {reference}, or it does not exist")
            self.images[reference] = image_id
            return image_id

    def create_sidecar(self, spec: SidecarSpec) -> str:
        self._enter("create_sidecar")
        with self._lock:
            if spec.image_id not in self.images.values() and spec.image_id not in self.images:
                raise ContainerGone(f"No such image: {spec.image_id}")
            if spec.memory_bytes is not None and spec.memory_bytes < MIN_MEMORY_BYTES:
                raise RuntimeRejected("Minimum memory limit allowed is 6MB")
            container_id = uuid.uuid4().hex + uuid.uuid4().hex
            self._containers[container_id] = FakeContainer(container_id, spec)
        for mount in spec.mounts:
            _open_the_way(Path(mount.source))
        return container_id

    def remove_container(self, container_id: str) -> None:
        self._enter("remove_container")
        self._drop(container_id)

    def is_running(self, container_id: str) -> bool:
        self._enter("is_running")
        with self._lock:
            container = self._containers.get(container_id)
            return container is not None and container.running

    def containers_with_label(self, label: str, value: str) -> list[str]:
        self._enter("containers_with_label")
        with self._lock:
            return [c.id for c in self._containers.values() if c.spec.labels.get(label) == value]

    def start_exec(self, container_id: str, spec: ExecSpec) -> str:
        self._enter("start_exec")
        with self._lock:
            container = self._containers.get(container_id)
            if container is None:
                raise ContainerGone(f"No such container: {container_id}")
            if not container.running:
                raise ContainerNotRunning(f"Container {container_id} is not running")
            argv, scrub_asked = self._host_argv(container, spec.argv)
            uid, gid = _user_ids(spec.user)
            try:
                process = subprocess.Popen(
                    argv,
                    env={"PATH": DEFAULT_PATH, **spec.env},
                    cwd=spec.workdir or "/",
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    user=uid,
                    group=gid,
                    extra_groups=None if uid is None else [],
                )
            except OSError as error:
                raise RuntimeRejected(f"OCI runtime exec failed: {error}") from None
            exec_id = uuid.uuid4().hex + uuid.uuid4().hex
            record = FakeExec(container_id, list(spec.argv), process, scrub_asked)
            record.pidfd = os.pidfd_open(process.pid)  # not reaped yet: no one waited
            record.watcher = threading.Thread(
                target=self._watch, args=(exec_id, record), name="fake-exec", daemon=True
            )
            self._execs[exec_id] = record
            self._running.append(record)
            self.started.append(list(spec.argv))
            record.watcher.start()
            return exec_id

    def exec_exit_code(self, exec_id: str) -> int | None:
        self._enter("exec_exit_code")
        with self._lock:
            record = self._execs.get(exec_id)
            if record is None:
                raise ContainerGone(f"No such exec instance: {exec_id}")
            return record.exit_code

    def wait_exec_events(self, on_exit: ExecExitCallback) -> None:
        self._enter("wait_exec_events")
        with self._lock:
            seen, ended = len(self._events), self._streams_ended
            while True:
                while (
                    len(self._events) == seen
                    and self._streams_ended == ended
                    and not self._closing.is_set()
                ):
                    self._lock.wait()
                if self._closing.is_set():
                    return
                if self._streams_ended != ended:
                    raise RuntimeUnavailable("the event stream ended")
                new, seen = self._events[seen:], len(self._events)
                self._lock.release()
                try:
                    for exec_id, code in new:
                        on_exit(exec_id, code)
                finally:
                    self._lock.acquire()

    def close(self) -> None:
        """Ends event streams and hangs; kills every exec still running (the fake's containers
        cannot outlive it) and waits for them."""
        with self._lock:
            self._closing.set()
            self._lock.notify_all()
            running = list(self._running)
        self._kill(running)

    # -------------------------------------------------------------- internals

    @staticmethod
    def _check(method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"{method!r} is not a ContainerRuntime method")

    def _enter(self, method: str) -> None:
        """Counts the call, then applies any hang and failure queued for it."""
        with self._lock:
            self.calls[method] += 1
            hangs, failures = self._hangs.get(method), self._failures.get(method)
            delay = hangs.pop(0) if hangs else 0.0
            error = failures.pop(0) if failures else None
        if delay:
            self._closing.wait(delay)
        if error is not None:
            raise error

    def _host_argv(self, container: FakeContainer, argv: list[str]) -> tuple[list[str], bool]:
        """argv[0] mapped through the mounts, and the runner's unsafe options dropped."""
        if not argv or argv[0] != RUNNER_IN_SIDECAR or argv[1:2] not in (["run"], ["cancel"]):
            raise RuntimeRejected(f"the fake runtime runs only the sidecar runner, not {argv}")
        runner = _on_host(container.spec, argv[0])
        if not os.path.isfile(runner):
            raise RuntimeRejected(f'exec: "{argv[0]}": no such file (not mounted?)')
        host = [runner, *argv[1:]]
        scrub_asked = False
        if argv[1] == "run" and len(argv) > _OPTIONS_AT:
            asked = argv[_OPTIONS_AT].split(",")
            scrub_asked = "scrub" in asked
            kept = [o for o in asked if o not in (*_HOST_ONLY_UNSAFE, "-")]
            host[_OPTIONS_AT] = ",".join(kept) or "-"
        return host, scrub_asked

    def _watch(self, exec_id: str, record: FakeExec) -> None:
        status = record.process.wait()
        with record.signalling:
            os.close(record.pidfd)
            record.pidfd = -1
        code = 128 - status if status < 0 else status
        if record.scrub_asked and not record.killed:
            _report_scrubbed(Path(record.argv[2]))
        with self._lock:
            record.exit_code = code
            if record in self._running:
                self._running.remove(record)
            self._events.append((exec_id, code))
            self._lock.notify_all()

    def _drop(self, container_id: str) -> None:
        with self._lock:
            if self._containers.pop(container_id, None) is None:
                return
            doomed = [e for e in self._running if e.container_id == container_id]
            for exec_id in [i for i, e in self._execs.items() if e.container_id == container_id]:
                del self._execs[exec_id]
        self._kill(doomed)

    def _kill(self, execs: list[FakeExec]) -> None:
        """SIGKILLs each exec's whole process tree and waits until its exit is reported."""
        for record in execs:
            record.killed = True
            with record.signalling:
                if record.pidfd >= 0:
                    _kill_tree(record.pidfd, record.process.pid)
        for record in execs:
            if record.watcher is not None and record.watcher is not threading.current_thread():
                record.watcher.join(10)


def _on_host(spec: SidecarSpec, path: str) -> str:
    """A path inside the container as a path on this host, through the longest mount."""
    for mount in sorted(spec.mounts, key=lambda m: len(m.target), reverse=True):
        target = mount.target.rstrip("/")
        if path == target or path.startswith(target + "/"):
            return mount.source.rstrip("/") + path[len(target) :]
    return path


def _user_ids(user: str) -> tuple[int | None, int | None]:
    """The uid and gid an exec as `uid[:gid]` (numeric) runs as; (None, None) for root, as
    this process already is."""
    if user in ("", "0", "0:0", "root"):
        return None, None
    uid, _, gid = user.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError:
        raise RuntimeRejected(f"unable to find user {user}: the fake needs uid:gid") from None


def _report_scrubbed(control: Path) -> None:
    """Marks the runner's report as scrubbed (see the module docstring), atomically."""
    report = control / REPORT
    try:
        text = report.read_text()
    except (OSError, UnicodeDecodeError):
        return
    if "\nscrubbed=0\n" not in f"\n{text}":
        return
    staged = control / f".{REPORT}.fake"
    staged.write_text(f"\n{text}".replace("\nscrubbed=0\n", "\nscrubbed=1\n")[1:])
    os.replace(staged, report)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _kill_tree(pidfd: int, root: int) -> None:
    """SIGKILLs the process `root` (through its pidfd) and every descendant: all are stopped
    first, until no new one shows up, so none can fork away meanwhile. Then waits (up to 5 s)
    until none of them is alive. Nothing to do if `root` was reaped already."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
    except ProcessLookupError:
        return
    stopped: set[int] = {root}
    while True:
        tree, found, todo = _children(), {root}, [root]
        while todo:
            for child in tree.get(todo.pop(), []):
                if child not in found and child != os.getpid():
                    found.add(child)
                    todo.append(child)
        new = found - stopped
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    for pid in stopped - {root}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in stopped - {root}):
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    """Running, or stopped, but not yet a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _open_the_way(source: Path) -> None:
    """A bind mount makes its source reachable inside the container whatever the modes of its
    parents on the host (the worker keeps EXEC_ROOT/sidecars root-only). The fake runs
    actions on the host, so it lets every user traverse (not list) that one parent."""
    parent = source.parent
    mode = parent.stat().st_mode & 0o7777
    if mode & 0o011 != 0o011:
        os.chmod(parent, mode | 0o011)
