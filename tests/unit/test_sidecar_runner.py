"""The static sidecar runner, run directly on this machine (no container needed)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from worker.execution.sidecar_run import read_runner_status
from worker.execution.wiring import DEFAULT_RUNNER

pytestmark = pytest.mark.skipif(
    not DEFAULT_RUNNER.exists(), reason="run `make` to build the runner"
)


def run(
    action_dir: Path, *argv: str, timeout_ms: int = 10_000
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            str(DEFAULT_RUNNER),
            "run",
            str(action_dir),
            str(timeout_ms),
            str(action_dir),
            "--",
            *argv,
        ],
        capture_output=True,
        timeout=30,
    )


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
    assert (tmp_path / "stdout").read_bytes() == b"out\n"
    assert (tmp_path / "stderr").read_bytes() == b"err\n"
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and (outcome.kind, outcome.exit_code) == ("exited", 7)
    assert result.stdout == b""  # nothing goes through the exec's own pipes


def test_signal_death_is_reported_as_128_plus_signal(tmp_path: Path) -> None:
    run(tmp_path, "sh", "-c", "kill -9 $$")
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and (outcome.kind, outcome.exit_code) == ("signaled", 137)


def test_missing_program_is_127_with_a_message(tmp_path: Path) -> None:
    assert run(tmp_path, "/no/such/program").returncode == 127
    assert b"cannot execute /no/such/program" in (tmp_path / "stderr").read_bytes()


def test_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    marker = f"sleep 31{os.getpid() % 1000:03}"
    began = time.monotonic()
    result = run(tmp_path, "sh", "-c", f"{marker} & {marker}", timeout_ms=300)
    assert time.monotonic() - began < 5
    assert result.returncode == 124
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and outcome.kind == "timeout"
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
    process = subprocess.Popen(
        [str(DEFAULT_RUNNER), "run", str(tmp_path), "0", str(tmp_path), "--", "sh", "-c", marker]
    )
    deadline = time.monotonic() + 10
    while not alive(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run([str(DEFAULT_RUNNER), "cancel", str(tmp_path)], check=True)
    assert process.wait(timeout=10) == 128 + 15
    outcome = read_runner_status(tmp_path)
    assert outcome is not None and outcome.kind == "cancelled"
    assert not alive(marker)
