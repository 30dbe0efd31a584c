"""The real-build figure: Bazel 4.2.3 building 100 independent genrules remotely."""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.bazel import Bazel, make_workspace

TARGETS = 100


def build_file() -> str:
    rules = [
        f'genrule(name = "g{i}", outs = ["g{i}.txt"], cmd = "echo {i} > $@")'
        for i in range(TARGETS)
    ]
    return "\n".join(rules) + "\n"


def build_seconds(address: str, exec_image: str, agent_image: str, root: Path) -> dict[str, float]:
    """Wall time of the same build on warm pools of dispatch `exec` (`exec_image`'s pool), on
    warm pools of dispatch `agent` (`agent_image`'s), and with a fresh container per action."""
    root.mkdir(parents=True)
    workspace = make_workspace(root, build_file())
    bazel = Bazel(workspace, root / "bazel-root")
    common = [
        f"--remote_executor=grpc://{address}",
        "--shell_executable=/bin/sh",
        "--noremote_accept_cached",
        "--jobs=8",
        "//:all",
    ]
    variants = {
        "exec": [f"--remote_default_exec_properties=container-image=docker://{exec_image}"],
        "agent": [f"--remote_default_exec_properties=container-image=docker://{agent_image}"],
        "container_per_action": [
            f"--remote_default_exec_properties=container-image=docker://{exec_image}",
            "--remote_default_exec_properties=sidecar-reuse=false",
        ],
    }
    figures: dict[str, float] = {}
    try:
        warmup = bazel.run("build", *variants["exec"], *common)  # starts Bazel's server
        if warmup.returncode != 0:
            raise RuntimeError(f"bazel warm-up build failed:\n{warmup.output[-3000:]}")
        for name, flags in variants.items():
            bazel.run("clean")
            began = time.perf_counter()
            run = bazel.run("build", *flags, *common)
            figures[name] = time.perf_counter() - began
            if run.returncode != 0 or run.process_counts().get("remote") != TARGETS:
                raise RuntimeError(f"bazel build ({name}) failed:\n{run.output[-3000:]}")
    finally:
        bazel.shutdown()
    return figures
