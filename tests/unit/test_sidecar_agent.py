"""The static sidecar runner's `agent` mode (sidecar/README.md), run directly on this machine.

The agent is a child of the test, and the test speaks its protocol over the agent's unix
socket. It passes `--test-same-pidns`, which the worker never does: without a container, the
test is in the agent's PID namespace, where a real worker never is. No request asks for
`scrub` (it would empty this machine's /tmp) or `exclusive` (it would kill every process of
uid 65534 here).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from worker.execution.wiring import DEFAULT_RUNNER
from worker.runner_contract import RunnerReport, parse_report

pytestmark = pytest.mark.skipif(
    not DEFAULT_RUNNER.exists() or os.geteuid() != 0,
    reason="needs root and the built runner (`make`)",
)

NOBODY = 65534
SECRET = "agent-test-secret-0123456789"
SAME_PIDNS = "--test-same-pidns"
IO_TIMEOUT_S = 20.0
# Added to the agent's own environment, which every action inherits unless the request
# overrides it. A PATH the action's user can search (root's own holds /root/...).
AGENT_ENV = {"PATH": "/usr/bin:/bin", "AGENT_ONLY": "inherited", "OVERRIDDEN": "from-agent"}


@pytest.fixture
def tmp_path(reachable_dir: Path) -> Path:
    return reachable_dir


# ------------------------------------------------------------------ processes


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def processes() -> Iterator[Path]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield entry


def sleeping(seconds: str) -> bool:
    """Whether some `sleep SECONDS` runs (a unique number marks one test's processes)."""
    wanted = b"sleep\0" + seconds.encode() + b"\0"
    for entry in processes():
        with contextlib.suppress(OSError):
            if (entry / "cmdline").read_bytes() == wanted:
                return True
    return False


def parent_of(pid: int) -> int:
    fields = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()
    return int(fields[1])


def children_of(pid: int) -> list[int]:
    found = []
    for entry in processes():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if parent_of(int(entry.name)) == pid:
                found.append(int(entry.name))
    return found


def unique_seconds(prefix: int) -> str:
    return f"{prefix}{os.getpid() % 1000:03}"


# ---------------------------------------------------------------------- agents


def listening(path: Path) -> bool:
    """Whether a unix socket listens at `path` (without connecting to it)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and fields[3] == "00010000":
            return True
    return False


class Agent:
    def __init__(self, directory: Path, flags: Sequence[str], secret: str | None) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700)
        if secret is not None:
            (directory / "secret").write_text(secret)
        command = [str(DEFAULT_RUNNER), "agent", str(directory), *flags]
        self.process = subprocess.Popen(command, env={**os.environ, **AGENT_ENV})
        wait_until(lambda: listening(self.socket_path) or self.process.poll() is not None)
        assert self.process.poll() is None, "the agent did not start"

    @property
    def socket_path(self) -> Path:
        return self.directory / "agent.sock"

    def stop(self) -> None:
        """Cancels what its handlers still run (SIGTERM, as `cancel` does), then kills it."""
        for handler in children_of(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handler, signal.SIGTERM)
        self.process.kill()
        self.process.wait(timeout=10)


class Agents:
    """Starts agents as children of the test; all are stopped when the test ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Agent] = []

    def start(self, *flags: str, secret: str | None = f"{SECRET}\n") -> Agent:
        agent = Agent(self.root / f"agent-{len(self.started)}", flags, secret)
        self.started.append(agent)
        return agent


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Agents]:
    started = Agents(tmp_path)
    try:
        yield started
    finally:
        for agent in started.started:
            agent.stop()


@pytest.fixture
def agent(agents: Agents) -> Agent:
    return agents.start(SAME_PIDNS)


# -------------------------------------------------------------------- protocol


class Connection:
    """The worker's side of one connection to the agent."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT_S)
        self.sock.connect(str(path))
        self.buffered = b""

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.sock.close()

    def line(self) -> bytes:
        """The next line with its newline; what came before the end if the agent closes."""
        while b"\n" not in self.buffered:
            chunk = self.sock.recv(4096)
            if not chunk:
                rest, self.buffered = self.buffered, b""
                return rest
            self.buffered += chunk
        line, _, self.buffered = self.buffered.partition(b"\n")
        return line + b"\n"

    def closed_by_agent(self) -> bool:
        return self.buffered == b"" and self.sock.recv(1) == b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


GREETING = f"sidecar-agent 1 {SECRET}\n".encode()


def message(fields: Sequence[str]) -> bytes:
    body = b"".join(field.encode() + b"\0" for field in fields)
    return struct.pack(">I", len(body)) + body


def action_dir(root: Path, name: str) -> Path:
    """An action's directory as the worker makes it: control/ root-only, work/ the user's."""
    action = root / name
    action.mkdir(mode=0o755)
    (action / "control").mkdir(mode=0o700)
    (action / "work").mkdir()
    os.chown(action / "work", NOBODY, NOBODY)
    return action


def request(
    action: Path,
    argv: Sequence[str],
    env: Sequence[str] = (),
    timeout_ms: int = 10_000,
    workdir: Path | None = None,
) -> list[str]:
    """A request's fields, for uid/gid 65534 and no options."""
    return [
        "run",
        str(action / "control"),
        str(NOBODY),
        str(NOBODY),
        str(timeout_ms),
        str(workdir or action / "work"),
        "-",
        str(len(argv)),
        *argv,
        str(len(env)),
        *env,
    ]


def submit(agent: Agent, fields: Sequence[str]) -> Connection:
    """Sends a request; returns the connection once the agent has acknowledged it."""
    connection = Connection(agent.socket_path)
    assert connection.line() == GREETING
    connection.send(message(fields))
    assert connection.line() == b"ack\n"
    return connection


def done_code(line: bytes) -> int:
    assert line.startswith(b"done ") and line.endswith(b"\n"), line
    return int(line[5:-1])


def run_through_agent(agent: Agent, fields: Sequence[str]) -> int:
    with submit(agent, fields) as connection:
        code = done_code(connection.line())
        assert connection.closed_by_agent()
        return code


def run_directly(action: Path, argv: Sequence[str], workdir: Path | None = None) -> int:
    """The same action through `sidecar-runner run`, as dispatch `exec` starts it."""
    command = request(action, argv, workdir=workdir)[1:7]
    result = subprocess.run(
        [str(DEFAULT_RUNNER), "run", *command, "--", *argv], capture_output=True, timeout=30
    )
    return result.returncode


def report(action: Path) -> RunnerReport:
    parsed = parse_report(report_text(action))
    assert parsed is not None
    return parsed


def report_text(action: Path) -> str:
    return (action / "control" / "status").read_text()


def output(action: Path, name: str) -> bytes:
    return (action / "control" / name).read_bytes()


# ----------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("written", "secret"),
    [(f"{SECRET}\n", SECRET), ("~" * 64, "~" * 64), ("with spaces\n", "with spaces")],
    ids=["trailing newline", "64 characters", "spaces"],
)
def test_greeting_carries_the_secret_which_is_gone_from_disk(
    agents: Agents, written: str, secret: str
) -> None:
    agent = agents.start(SAME_PIDNS, secret=written)
    assert not (agent.directory / "secret").exists()
    mode = agent.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    with Connection(agent.socket_path) as connection:
        assert connection.line() == f"sidecar-agent 1 {secret}\n".encode()


@pytest.mark.parametrize(
    "written",
    [None, "", "\n", "x" * 65, "tab\there", "two\n\n"],
    ids=["missing", "empty", "only a newline", "too long", "not printable", "two newlines"],
)
def test_without_a_valid_secret_the_agent_exits_2(tmp_path: Path, written: str | None) -> None:
    directory = tmp_path / "agent"
    directory.mkdir(mode=0o700)
    if written is not None:
        (directory / "secret").write_text(written)
    result = subprocess.run(
        [str(DEFAULT_RUNNER), "agent", str(directory), SAME_PIDNS],
        capture_output=True,
        timeout=10,
    )
    assert result.returncode == 2
    assert b"no valid secret" in result.stderr
    assert not (directory / "secret").exists()
    assert not (directory / "agent.sock").exists()


def test_an_action_runs_and_reports_exactly_as_with_run(agent: Agent, tmp_path: Path) -> None:
    argv = ("sh", "-c", "echo out; echo err >&2; exit 7")
    through_agent = action_dir(tmp_path, "through-agent")
    with submit(agent, request(through_agent, argv)) as connection:
        assert connection.line() == b"done 7\n"
        assert connection.closed_by_agent()
    assert output(through_agent, "stdout") == b"out\n"
    assert output(through_agent, "stderr") == b"err\n"
    assert (report(through_agent).outcome, report(through_agent).code) == ("exited", 7)

    direct = action_dir(tmp_path, "direct")
    assert run_directly(direct, argv) == 7
    assert report_text(through_agent) == report_text(direct)


def test_the_action_starts_in_the_same_state_as_with_run(agent: Agent, tmp_path: Path) -> None:
    """Identity, groups, capabilities, no_new_privs, signal mask and ignored signals (the
    agent ignores SIGPIPE and SIGCHLD), umask (the agent binds its socket under 077)."""
    keys = "Uid|Gid|Groups|SigBlk|SigIgn|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs"
    argv = ("sh", "-c", f"umask; exec grep -E '^({keys}):' /proc/self/status")
    through_agent = action_dir(tmp_path, "through-agent")
    direct = action_dir(tmp_path, "direct")
    assert run_through_agent(agent, request(through_agent, argv)) == 0
    assert run_directly(direct, argv) == 0
    state = output(through_agent, "stdout")
    assert state == output(direct, "stdout")
    assert b"CapEff:\t0000000000000000\n" in state and b"SigIgn:\t0000000000000000\n" in state


def test_the_environment_is_the_agents_overlaid_with_the_request(
    agent: Agent, tmp_path: Path
) -> None:
    action = action_dir(tmp_path, "action")
    env = ("OVERRIDDEN=first", "FROM_REQUEST=yes", "OVERRIDDEN=last")
    assert run_through_agent(agent, request(action, ("env",), env=env)) == 0
    lines = output(action, "stdout").decode().splitlines()
    assert "AGENT_ONLY=inherited" in lines
    assert [line for line in lines if line.startswith("OVERRIDDEN=")] == ["OVERRIDDEN=last"]
    # A name the agent has keeps its place; a new one is appended.
    assert lines.index("OVERRIDDEN=last") < lines.index("FROM_REQUEST=yes") == len(lines) - 1


def test_the_program_is_found_on_the_requests_path(agent: Agent, tmp_path: Path) -> None:
    programs = tmp_path / "bin"
    programs.mkdir()
    program = programs / "only-on-request-path"
    program.write_text("#!/bin/sh\necho found\n")
    program.chmod(0o755)
    argv = (program.name,)
    found = action_dir(tmp_path, "found")
    path = f"PATH={programs}:/usr/bin:/bin"
    assert run_through_agent(agent, request(found, argv, env=(path,))) == 0
    assert output(found, "stdout") == b"found\n"
    not_found = action_dir(tmp_path, "not-found")
    assert run_through_agent(agent, request(not_found, argv)) == 127


def test_a_missing_program_is_127_with_a_message(agent: Agent, tmp_path: Path) -> None:
    action = action_dir(tmp_path, "action")
    assert run_through_agent(agent, request(action, ("/no/such/program",))) == 127
    assert b"cannot execute /no/such/program" in output(action, "stderr")


def test_a_missing_working_directory_is_125_with_runs_message(agent: Agent, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    through_agent = action_dir(tmp_path, "through-agent")
    direct = action_dir(tmp_path, "direct")
    assert run_through_agent(agent, request(through_agent, ("true",), workdir=nowhere)) == 125
    assert run_directly(direct, ("true",), workdir=nowhere) == 125
    message_text = output(through_agent, "stderr")
    assert message_text == output(direct, "stderr")
    assert b"cannot enter working directory" in message_text
    assert report_text(through_agent) == report_text(direct)


def test_a_timeout_kills_the_whole_tree(agent: Agent, tmp_path: Path) -> None:
    seconds = unique_seconds(41)
    action = action_dir(tmp_path, "action")
    argv = ("sh", "-c", f"sleep {seconds} & sleep {seconds}")
    began = time.monotonic()
    assert run_through_agent(agent, request(action, argv, timeout_ms=300)) == 124
    assert time.monotonic() - began < 5
    assert (report(action).outcome, report(action).code) == ("timeout", 124)
    assert not sleeping(seconds)


@pytest.mark.parametrize("hang_up", ["shutdown", "a byte"])
def test_the_worker_hanging_up_cancels(agent: Agent, tmp_path: Path, hang_up: str) -> None:
    seconds = unique_seconds(42)
    action = action_dir(tmp_path, "action")
    argv = ("sh", "-c", f"sleep {seconds} & sleep {seconds}")
    with submit(agent, request(action, argv, timeout_ms=0)) as connection:
        wait_until(lambda: sleeping(seconds))
        if hang_up == "shutdown":
            connection.sock.shutdown(socket.SHUT_WR)
        else:
            connection.send(b"x")
        assert connection.line() == b"done 143\n"
    assert (report(action).outcome, report(action).code) == ("cancelled", signal.SIGTERM)
    assert not sleeping(seconds)


def test_cancel_reaches_the_handler_as_it_reaches_run(agent: Agent, tmp_path: Path) -> None:
    seconds = unique_seconds(43)
    action = action_dir(tmp_path, "action")
    with submit(agent, request(action, ("sleep", seconds), timeout_ms=0)) as connection:
        wait_until(lambda: sleeping(seconds))
        handler = int((action / "control" / "pid").read_text())
        assert parent_of(handler) == agent.process.pid
        cancel = [str(DEFAULT_RUNNER), "cancel", str(action / "control")]
        subprocess.run(cancel, check=True, timeout=10)
        assert connection.line() == b"done 143\n"
    assert (report(action).outcome, report(action).code) == ("cancelled", signal.SIGTERM)
    assert not sleeping(seconds)


def test_two_connections_run_at_once(agent: Agent, tmp_path: Path) -> None:
    """The first action can only end because the second ran while it was running."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, NOBODY, NOBODY)
    flag = shared / "flag"
    waits = ("sh", "-c", f"until [ -e {flag} ]; do sleep 0.02; done")
    with submit(agent, request(action_dir(tmp_path, "waits"), waits)) as waiting:
        sets = action_dir(tmp_path, "sets")
        assert run_through_agent(agent, request(sets, ("touch", str(flag)))) == 0
        assert waiting.line() == b"done 0\n"


# A well-formed request (never run) to spoil.
GOOD = request(Path("/nonexistent"), ("true",), env=("A=1",))
MALFORMED: dict[str, tuple[bytes, bool, bytes]] = {
    # name: (bytes sent after the greeting, whether the test then hangs up, the reply)
    "not run": (message(["cancel", *GOOD[1:]]), False, b"error not a run request\n"),
    "missing fields": (message(GOOD[:5]), False, b"error missing fields\n"),
    "bad uid": (message([*GOOD[:2], "-1", *GOOD[3:]]), False, b"error bad uid\n"),
    "uid too big": (message([*GOOD[:2], "2147483648", *GOOD[3:]]), False, b"error bad uid\n"),
    "bad gid": (message([*GOOD[:3], "x", *GOOD[4:]]), False, b"error bad gid\n"),
    "bad timeout": (message([*GOOD[:4], "1.5", *GOOD[5:]]), False, b"error bad timeout\n"),
    "no arguments": (
        message([*GOOD[:7], "0", "0"]),
        False,
        b"error bad argument count\n",
    ),
    "fewer arguments than counted": (
        message([*GOOD[:7], "3", "true", "0"]),
        False,
        b"error fewer fields than counted\n",
    ),
    "more fields than counted": (
        message([*GOOD, "extra"]),
        False,
        b"error more fields than counted\n",
    ),
    "environment entry without a name": (
        message([*GOOD[:-1], "=1"]),
        False,
        b"error bad environment entry\n",
    ),
    "environment entry without =": (
        message([*GOOD[:-1], "A"]),
        False,
        b"error bad environment entry\n",
    ),
    "no NUL at the end": (
        struct.pack(">I", 3) + b"run",
        False,
        b"error the last field does not end with NUL\n",
    ),
    "empty": (struct.pack(">I", 0), False, b"error bad request length\n"),
    "longer than 1 MiB": (struct.pack(">I", (1 << 20) + 1), False, b"error bad request length\n"),
    "truncated": (struct.pack(">I", 100) + b"run\0", True, b"error truncated request\n"),
}


@pytest.mark.parametrize(("sent", "hang_up", "reply"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_is_refused_and_the_agent_serves_on(
    agent: Agent, tmp_path: Path, sent: bytes, hang_up: bool, reply: bytes
) -> None:
    with Connection(agent.socket_path) as connection:
        assert connection.line() == GREETING
        connection.send(sent)
        if hang_up:
            connection.sock.shutdown(socket.SHUT_WR)
        assert connection.line() == reply
        assert connection.closed_by_agent()
    assert run_through_agent(agent, request(action_dir(tmp_path, "after"), ("true",))) == 0


def test_a_silent_peer_is_dropped_after_the_request_deadline(agent: Agent) -> None:
    with Connection(agent.socket_path) as connection:
        assert connection.line() == GREETING
        began = time.monotonic()
        assert connection.line() == b"error request timed out\n"
        assert 4 < time.monotonic() - began < 10


def test_a_peer_in_the_agents_own_pid_namespace_is_refused(agents: Agents) -> None:
    """Without the test-only flag, the test is what a process of the sidecar would be."""
    agent = agents.start()
    with Connection(agent.socket_path) as connection:
        assert connection.line() == b""  # closed without the greeting
    assert agent.process.poll() is None


def test_the_agents_environment_is_closed_to_an_action_user(agent: Agent) -> None:
    """As uid 65534 (an action's user), the agent's environment cannot be read. (The uid
    differs, so this holds for any root process; the next test is the one about
    PR_SET_DUMPABLE.)"""
    result = subprocess.run(
        ["cat", f"/proc/{agent.process.pid}/environ"],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        timeout=10,
    )
    assert result.returncode != 0 and b"Permission denied" in result.stderr


def kernel_honours_pr_set_dumpable() -> bool:
    probe = "import ctypes; c = ctypes.CDLL(None); c.prctl(4, 0, 0, 0, 0); print(c.prctl(3, 0))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=10)
    return result.stdout.strip() == b"0"


@pytest.mark.skipif(
    shutil.which("setpriv") is None or not kernel_honours_pr_set_dumpable(),
    reason="needs setpriv and a kernel that honours PR_SET_DUMPABLE",
)
def test_a_root_process_with_the_agents_capabilities_cannot_open_its_memory(
    agents: Agents,
) -> None:
    """Like a root action in a sidecar: the same uid and capabilities as the agent, but no
    CAP_SYS_PTRACE. Only the agent's being non-dumpable keeps /proc/PID/mem closed to it, as
    a dumpable process started the same way shows."""
    same_caps = ["setpriv", "--bounding-set=-sys_ptrace"]
    directory = agents.root / "capped-agent"
    directory.mkdir(mode=0o700)
    (directory / "secret").write_text(SECRET)
    capped_agent = subprocess.Popen(
        [*same_caps, str(DEFAULT_RUNNER), "agent", str(directory), SAME_PIDNS]
    )
    dumpable = subprocess.Popen([*same_caps, "sleep", "60"])
    try:
        wait_until(lambda: listening(directory / "agent.sock"))

        def memory_opens(pid: int) -> bool:
            opener = f"open('/proc/{pid}/mem', 'rb')"
            command = [*same_caps, sys.executable, "-c", opener]
            return subprocess.run(command, capture_output=True, timeout=10).returncode == 0

        assert memory_opens(dumpable.pid)
        assert not memory_opens(capped_agent.pid)
    finally:
        for process in (capped_agent, dumpable):
            process.kill()
            process.wait(timeout=10)
