"""The one description of an action's directory and of a request to the sidecar runner.

sidecar/runner.c mirrors this; sidecar/README.md states it for people. Who may write what:

    SIDECAR_DIR/            root 0755, the only host directory a sidecar mounts (same path)
      <action id>/          root 0755: the action cannot rename or replace anything in it
        control/            root 0700: the runner's pid, stdout, stderr and report (status),
                            and for dispatch exec the action's variables (env)
        root/               the action's user: the input root, outputs, working directory
        home/  tmp/         the action's user: HOME and TMPDIR
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

RUNNER_DIR_IN_SIDECAR = "/.sidecar-executor"
RUNNER_IN_SIDECAR = f"{RUNNER_DIR_IN_SIDECAR}/sidecar-runner"
# Dispatch `agent`: the agent's own root-only directory (socket, one-time secret).
AGENT_DIR_IN_SIDECAR = "/.sidecar-agent"
AGENT_SOCKET = "agent.sock"
AGENT_SECRET = "secret"
AGENT_PROTOCOL = "sidecar-agent 1"
MAX_AGENT_REQUEST_BYTES = 1 << 20

CONTROL = "control"
INPUT_ROOT = "root"
HOME = "home"
TMP = "tmp"
STDOUT = "stdout"
STDERR = "stderr"
REPORT = "status"
ENVIRONMENT = "env"  # dispatch exec: the action's variables, NUL-terminated NAME=value


@dataclass(frozen=True)
class ActionDir:
    """Where one action lives inside the directory of the sidecar that runs it."""

    sidecar_dir: Path
    name: str

    @classmethod
    def new(cls, sidecar_dir: Path) -> ActionDir:
        return cls(sidecar_dir, uuid.uuid4().hex)

    @property
    def path(self) -> Path:
        return self.sidecar_dir / self.name

    @property
    def control(self) -> Path:
        return self.path / CONTROL

    @property
    def input_root(self) -> Path:
        return self.path / INPUT_ROOT

    @property
    def home(self) -> Path:
        return self.path / HOME

    @property
    def tmp(self) -> Path:
        return self.path / TMP


@dataclass(frozen=True)
class RunRequest:
    """One action for the runner: `sidecar-runner run CONTROL UID GID TIMEOUT_MS WORKDIR
    OPTIONS -- ARGV...`. `scrub` empties /tmp, /var/tmp, /dev/shm, /dev/mqueue and SysV IPC
    afterwards; `exclusive` (one action per sidecar) kills every process left with the uid."""

    control_dir: Path
    uid: int
    gid: int
    timeout_ms: int
    working_dir: Path
    argv: tuple[str, ...]
    scrub: bool
    exclusive: bool

    @property
    def options(self) -> str:
        """The OPTIONS field: `-` or a comma list of `scrub`, `exclusive`."""
        chosen = [name for name, on in (("scrub", self.scrub), ("exclusive", self.exclusive)) if on]
        return ",".join(chosen) or "-"

    def runner_argv(self) -> list[str]:
        return [
            RUNNER_IN_SIDECAR,
            "run",
            str(self.control_dir),
            str(self.uid),
            str(self.gid),
            str(self.timeout_ms),
            str(self.working_dir),
            self.options,
            "--",
            *self.argv,
        ]

    def agent_message(self, env: dict[str, str]) -> bytes:
        """The request as the agent reads it (sidecar/README.md): a 4-byte big-endian length,
        then NUL-terminated fields."""
        fields = [
            "run",
            str(self.control_dir),
            str(self.uid),
            str(self.gid),
            str(self.timeout_ms),
            str(self.working_dir),
            self.options,
            str(len(self.argv)),
            *self.argv,
            str(len(env)),
            *(f"{name}={value}" for name, value in env.items()),
        ]
        body = b"".join(field.encode() + b"\0" for field in fields)
        return len(body).to_bytes(4, "big") + body


def environment_entries(env: dict[str, str]) -> bytes:
    return b"".join(f"{name}={value}".encode() + b"\0" for name, value in env.items())


def cancel_argv(control_dir: Path) -> list[str]:
    return [RUNNER_IN_SIDECAR, "cancel", str(control_dir)]


OUTCOMES = ("exited", "signaled", "timeout", "cancelled", "unclean", "runner_error")


@dataclass(frozen=True)
class RunnerReport:
    """What the runner wrote to control/status."""

    outcome: str
    code: int
    strays_killed: int
    survivors: int
    oom_kills: int
    scrubbed: bool


def parse_report(text: str) -> RunnerReport | None:
    """The report, or None if it is not exactly what the runner writes (then nothing in it
    can be believed)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or key in fields:
            return None
        fields[key] = value
    expected = {"outcome", "code", "strays_killed", "survivors", "oom_kills", "scrubbed"}
    if set(fields) != expected or fields["outcome"] not in OUTCOMES:
        return None
    try:
        numbers = {k: int(v) for k, v in fields.items() if k != "outcome"}
    except ValueError:
        return None
    if numbers["scrubbed"] not in (0, 1) or min(numbers.values()) < -1:
        return None
    return RunnerReport(
        outcome=fields["outcome"],
        code=numbers["code"],
        strays_killed=max(numbers["strays_killed"], 0),
        survivors=max(numbers["survivors"], 0),
        oom_kills=max(numbers["oom_kills"], 0),
        scrubbed=numbers["scrubbed"] == 1,
    )
