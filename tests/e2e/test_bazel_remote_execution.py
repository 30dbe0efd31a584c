"""End to end: real Bazel 4.2.3 executing remotely in per-image sidecars."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.bazel import BAZEL, Bazel, make_workspace
from tests.images import IMAGE_A, IMAGE_B
from tests.serving import RunningService

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.docker,
    pytest.mark.skipif(
        BAZEL is None, reason="needs Debian's bazel-bootstrap (make test installs it)"
    ),
]

BUILD = f"""
genrule(
    name = "from_default",
    outs = ["from_default.txt"],
    cmd = "cat /etc/image-name > $@ && ls /etc/only-in-image-a >> $@",
)
genrule(
    name = "from_b",
    outs = ["from_b.txt"],
    cmd = "cat /etc/image-name > $@ && ls /etc/only-in-image-b >> $@",
    exec_properties = {{"container-image": "docker://{IMAGE_B}"}},
)
genrule(
    name = "combined",
    srcs = [":from_default", ":from_b", "input.txt"],
    outs = ["combined.txt"],
    cmd = "cat $(SRCS) > $@",
)
"""


def test_bazel_runs_each_target_in_the_image_it_names(
    exec_service: RunningService, tmp_path: Path
) -> None:
    workspace = make_workspace(tmp_path, BUILD, {"input.txt": "from the source tree\n"})
    flags = [
        f"--remote_executor=grpc://{exec_service.address}",
        f"--remote_default_exec_properties=container-image=docker://{IMAGE_A}",
        "--shell_executable=/bin/sh",
        "//:all",
    ]
    first = Bazel(workspace, tmp_path / "root1")
    try:
        run = first.run("build", *flags)
        assert run.returncode == 0, run.output
        assert run.process_counts().get("remote") == 3, run.output
        outputs = {
            name: (workspace / "bazel-bin" / name).read_text()
            for name in ("from_default.txt", "from_b.txt", "combined.txt")
        }
    finally:
        first.shutdown()
    assert outputs["from_default.txt"] == "image-a\n/etc/only-in-image-a\n"
    assert outputs["from_b.txt"] == "image-b\n/etc/only-in-image-b\n"
    assert outputs["combined.txt"] == (
        outputs["from_default.txt"] + outputs["from_b.txt"] + "from the source tree\n"
    )

    second = Bazel(workspace, tmp_path / "root2")
    try:
        run = second.run("build", *flags)
        assert run.returncode == 0, run.output
        assert run.process_counts().get("remote cache hit") == 3, run.output
    finally:
        second.shutdown()
