"""Drives the real Bazel 4.2.3 (Debian's bazel-bootstrap) against our service, offline."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BAZEL = shutil.which("bazel")


@dataclass
class BazelRun:
    returncode: int
    output: str

    def process_counts(self) -> dict[str, int]:
        """The 'INFO: N processes: 3 remote cache hit, 1 internal.' summary, by kind."""
        match = re.search(r"INFO: \d+ process(?:es)?: (.*)\.", self.output)
        if not match:
            return {}
        counts: dict[str, int] = {}
        for part in match.group(1).split(","):
            number, _, kind = part.strip().partition(" ")
            counts[kind] = int(number)
        return counts


def make_workspace(root: Path, build: str, files: dict[str, str] | None = None) -> Path:
    """A workspace directory with an empty WORKSPACE, the given BUILD and source files."""
    workspace = root / "ws"
    workspace.mkdir()
    (workspace / "WORKSPACE").write_text("")
    (workspace / "BUILD").write_text(build)
    for name, text in (files or {}).items():
        (workspace / name).write_text(text)
    return workspace


class Bazel:
    """One Bazel client with its own output root, so tests never share a Bazel server."""

    def __init__(
        self, workspace: Path, output_root: Path, startup_options: Sequence[str] = ()
    ) -> None:
        assert BAZEL is not None
        self.workspace = workspace
        self.output_root = output_root
        self.startup_options = list(startup_options)
        self.home = output_root / "home"
        self.home.mkdir(parents=True, exist_ok=True)

    def run(self, *args: str, timeout_s: float = 600) -> BazelRun:
        assert BAZEL is not None
        command = [
            BAZEL,
            f"--output_user_root={self.output_root}",
            "--max_idle_secs=10",
            *self.startup_options,
            args[0],
            "--nosandbox_debug",
            *args[1:],
        ]
        result = subprocess.run(
            command,
            cwd=self.workspace,
            env={"HOME": str(self.home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        return BazelRun(result.returncode, result.stdout + result.stderr)

    def shutdown(self) -> None:
        assert BAZEL is not None
        subprocess.run(
            [BAZEL, f"--output_user_root={self.output_root}", *self.startup_options, "shutdown"],
            cwd=self.workspace,
            env={"HOME": str(self.home), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=120,
            check=False,
        )
