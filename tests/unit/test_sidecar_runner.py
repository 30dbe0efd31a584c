"""The static sidecar runner, run directly on this machine (no container needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker.execution.wiring import DEFAULT_RUNNER
from worker.runner_contract import RunnerReport, parse_report

pytestmark = pytest.mark.skipif(
    not DEFAULT_RUNNER.exists(), reason="run `make` to build the runner"
)


NOBODY = 65534


@pytest.fixture
def tmp_path(reachable_dir: Path) -> Path:
    return reachable_dir


def runner_argv(action_dir: Path, *argv: str, timeout_ms: int = 10_000) -> list[str]:
    """The runner as the worker starts it (as root), for uid/gid 65534, without the scrub
    of /tmp (which would empty this machine's)."""
    control = action_dir / "control"
    control.mkdir(mode=0o700, exist_ok=True)
    work = action_dir / "work"
    work.mkdir(exist_ok=True)
    os.chown(work, NOBODY, NOBODY)
    return [
        str(DEFAULT_RUNNER),
        "run",
        str(control),
        str(NOBODY),
        str(NOBODY),
        str(timeout_ms),
        str(work),
        "-",
        "--",
        *argv,
    ]


def run(
    action_dir: Path, *argv: str, timeout_ms: int = 10_000
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        runner_argv(action_dir, *argv, timeout_ms=timeout_ms), capture_output=True, timeout=30
    )


def read_runner_status(action_dir: Path) -> RunnerReport | None:
    return parse_report((action_dir / "control" / "status").read_text())


def alive(marker: str) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def test_exit_code_and_output_files(tmp_path: Path) -> None:
    result = run(tmp_path, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert (tmp_path / "control" / "stdout").read_bytes() == b"out\n"
    assert (tmp_path / "control" / "stderr").read_bytes() == b"err\n"
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and (outcome.outcome, outcome.code) == ("exited", 7)
    assert result.stdout == b""  # nothing goes through the exec's own pipes


def test_signal_death_is_reported_as_128_plus_signal(tmp_path: Path) -> None:
    run(tmp_path, "sh", "-c", "kill -9 $$")
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and (outcome.outcome, outcome.code) == ("signaled", 9)


def test_missing_program_is_127_with_a_message(tmp_path: Path) -> None:
    assert run(tmp_path, "/no/such/program").returncode == 127
    assert b"cannot execute /no/such/program" in (tmp_path / "control" / "stderr").read_bytes()


def test_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    marker = f"sleep 31{os.getpid() % 1000:03}"
    began = time.monotonic()
    result = run(tmp_path, "sh", "-c", f"{marker} & {marker}", timeout_ms=300)
    assert time.monotonic() - began < 5
    assert result.returncode == 124
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and outcome.outcome == "timeout"
    assert not alive(marker)


def test_processes_that_escape_with_setsid_are_killed_when_the_action_ends(tmp_path: Path) -> None:
    marker = f"sleep 32{os.getpid() % 1000:03}"
    result = run(tmp_path, "sh", "-c", f"setsid sh -c '{marker} & {marker}' & sleep 0.2; exit 0")
    assert result.returncode == 0
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and outcome.strays_killed >= 1
    assert not alive(marker)


def test_cancel_kills_a_running_action(tmp_path: Path) -> None:
    marker = f"sleep 33{os.getpid() % 1000:03}"
    process = subprocess.Popen(runner_argv(tmp_path, "sh", "-c", marker, timeout_ms=0))
    deadline = time.monotonic() + 10
    while not alive(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run([str(DEFAULT_RUNNER), "cancel", str(tmp_path / "control")], check=True)
    assert process.wait(timeout=10) == 128 + 15
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and outcome.outcome == "cancelled"
    assert not alive(marker)


def test_the_action_gets_its_variables_from_the_control_dir_not_from_the_exec(
    tmp_path: Path,
) -> None:
    """The worker writes the action's variables into control/env; the runner itself, root,
    starts without them (a client's GLIBC_TUNABLES must not reach its libc)."""
    argv = runner_argv(tmp_path, "sh", "-c", 'echo "$FROM_FILE $KEPT"')
    (tmp_path / "control" / "env").write_bytes(b"FROM_FILE=yes\0KEPT=overridden\0")
    result = subprocess.run(
        argv, capture_output=True, timeout=30, env={"KEPT": "runner's", "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0
    assert (tmp_path / "control" / "stdout").read_bytes() == b"yes overridden\n"


def test_a_malformed_environment_file_runs_nothing(tmp_path: Path) -> None:
    argv = runner_argv(tmp_path, "sh", "-c", "echo ran")
    (tmp_path / "control" / "env").write_bytes(b"=no-name\0")
    result = subprocess.run(argv, capture_output=True, timeout=30)
    assert result.returncode == 125
    assert b"env is not a list" in result.stderr
    assert not (tmp_path / "control" / "stdout").exists()


# Ignores signal 33 with the system call (libc keeps 32 and 33 for itself and will not touch
# them), then becomes the runner: an ignored disposition survives exec.
IGNORE_33_THEN_EXEC = """
import ctypes, os, sys
sigaction = (ctypes.c_ulong * 4)(1, 0, 0, 0)  # SIG_IGN
assert ctypes.CDLL(None).syscall(13, 33, sigaction, None, 8) == 0  # rt_sigaction, x86-64
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="uses x86-64's rt_sigaction number")
def test_the_action_starts_with_no_signal_ignored_whatever_the_runner_inherited(
    tmp_path: Path,
) -> None:
    """As under `docker exec`; a long test run once left signal 33 ignored in the process
    that started the runner, and the action inherited it."""
    argv = runner_argv(tmp_path, "sh", "-c", "grep SigIgn /proc/self/status")
    result = subprocess.run(
        [sys.executable, "-c", IGNORE_33_THEN_EXEC, *argv], capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "control" / "stdout").read_bytes() == b"SigIgn:\t0000000000000000\n"
