"""Real Bazel 4.2.3 with --remote_executor pointed at BuildGrid, two of our workers attached."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.bazel import BAZEL, Bazel, make_workspace
from tests.images import IMAGE_A, IMAGE_B
from tests.scaleout.conftest import StartWorker
from tests.scaleout.services import BuildGrid, wait_until

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.docker,
    pytest.mark.skipif(
        BAZEL is None, reason="needs Debian's bazel-bootstrap (make test installs it)"
    ),
]

TARGETS = 4  # per image


def build_file() -> str:
    """Each output names the image that ran it (its /etc/image-name and a file only that image
    has); each action sleeps a little so that one worker cannot take them all."""
    rule = """
genrule(
    name = "in_{marker}_{index}",
    srcs = ["input.txt"],
    outs = ["in_{marker}_{index}.txt"],
    cmd = "sleep 2; cat /etc/image-name > $@; ls /etc/only-in-image-{marker} >> $@; "
          + "echo {index} >> $@; cat $(location input.txt) >> $@",
    exec_properties = {{"container-image": "docker://{image}"}},
)"""
    return "\n".join(
        rule.format(marker=marker, index=index, image=image)
        for image, marker in ((IMAGE_A, "a"), (IMAGE_B, "b"))
        for index in range(TARGETS)
    )


def test_bazel_builds_through_buildgrid_on_two_workers(
    buildgrid: BuildGrid, start_worker: StartWorker, tmp_path: Path
) -> None:
    first = start_worker("first")
    second = start_worker("second")
    workspace = make_workspace(tmp_path, build_file(), {"input.txt": "from the source tree\n"})
    bazel = Bazel(workspace, tmp_path / "bazel-root")
    try:
        run = bazel.run(
            "build",
            f"--remote_executor={buildgrid.url}",
            "--shell_executable=/bin/sh",
            "--jobs=8",
            "//:all",
        )
    finally:
        bazel.shutdown()
    assert run.returncode == 0, run.output
    assert run.process_counts().get("remote") == 2 * TARGETS, run.output
    for marker in ("a", "b"):
        for index in range(TARGETS):
            text = (workspace / "bazel-bin" / f"in_{marker}_{index}.txt").read_text()
            assert text == (
                f"image-{marker}\n/etc/only-in-image-{marker}\n{index}\nfrom the source tree\n"
            )
    wait_until(
        lambda: (
            first.status()["leases_completed"] + second.status()["leases_completed"] == 2 * TARGETS
        ),
        30,
        "both workers' reports",
    )
    assert first.status()["leases_completed"] > 0, first.log()
    assert second.status()["leases_completed"] > 0, second.log()
