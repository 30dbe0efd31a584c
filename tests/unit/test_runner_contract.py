"""The runner's request and report, and how the worker judges a report (no Docker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.execution.sidecar_run import judge
from worker.runner_contract import RunRequest, parse_report


def as_user(uid: int) -> RunRequest:
    """A request as the executor makes it for a sidecar running one action at a time."""
    return RunRequest(
        control_dir=Path("/c"),
        uid=uid,
        gid=uid,
        timeout_ms=1000,
        working_dir=Path("/w"),
        argv=("true",),
        scrub=uid != 0,
        exclusive=True,
    )


GOOD = "outcome=exited\ncode=3\nstrays_killed=1\nsurvivors=0\noom_kills=0\nscrubbed=1\n"


def test_request_argv_is_what_the_runner_parses() -> None:
    request = RunRequest(
        control_dir=Path("/x/a/control"),
        uid=65534,
        gid=100,
        timeout_ms=1500,
        working_dir=Path("/x/a/root/w"),
        argv=("sh", "-c", "echo"),
        scrub=True,
        exclusive=False,
    )
    assert request.runner_argv() == [
        "/.sidecar-executor/sidecar-runner",
        "run",
        "/x/a/control",
        "65534",
        "100",
        "1500",
        "/x/a/root/w",
        "scrub",
        "--",
        "sh",
        "-c",
        "echo",
    ]


def test_a_well_formed_report_is_read() -> None:
    report = parse_report(GOOD)
    assert report is not None
    assert (report.outcome, report.code, report.strays_killed, report.scrubbed) == (
        "exited",
        3,
        1,
        True,
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        GOOD.replace("outcome=exited", "outcome=fine"),
        GOOD + "outcome=exited\n",  # a key twice
        GOOD + "extra=1\n",
        GOOD.replace("code=3", "code=three"),
        GOOD.replace("scrubbed=1", "scrubbed=2"),
        GOOD.replace("survivors=0\n", ""),
        "garbage",
    ],
)
def test_anything_else_is_not_a_report(text: str) -> None:
    assert parse_report(text) is None


def test_reuse_needs_a_clean_report_that_agrees_with_the_exec() -> None:
    report = parse_report(GOOD)
    assert judge(report, 3, as_user(65534)).sidecar_reusable
    # The exec's exit code contradicts the report: not written by a runner that finished.
    contradicted = judge(report, 0, as_user(65534))
    assert contradicted.kind == "lost" and not contradicted.sidecar_reusable
    # Survivors, an unscrubbed sidecar, or root: the sidecar goes.
    assert not judge(
        parse_report(GOOD.replace("survivors=0", "survivors=2")), 3, as_user(65534)
    ).clean
    assert not judge(
        parse_report(GOOD.replace("scrubbed=1", "scrubbed=0")), 3, as_user(65534)
    ).clean
    assert not judge(report, 3, as_user(0)).sidecar_reusable


def test_missing_or_malformed_reports_lose_the_sidecar() -> None:
    assert judge(None, 137, as_user(65534)).kind == "lost"
    forged = judge("the report is malformed", 0, as_user(65534))
    assert forged.kind == "lost" and "malformed" in forged.detail


def test_killed_actions_report_128_plus_sigkill() -> None:
    timeout = judge(
        parse_report(GOOD.replace("exited", "timeout").replace("=3", "=124")), 124, as_user(1)
    )
    assert (timeout.kind, timeout.exit_code) == ("timeout", 137)
