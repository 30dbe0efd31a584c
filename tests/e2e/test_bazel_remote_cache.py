"""End to end: real Bazel 4.2.3 using the service as its remote cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.bazel import BAZEL, Bazel, make_workspace
from tests.serving import RunningService

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.skipif(
        BAZEL is None, reason="needs Debian's bazel-bootstrap (make test installs it)"
    ),
]

BUILD = """
genrule(name = "greeting", outs = ["greeting.txt"], cmd = "echo hello from a genrule > $@")
genrule(
    name = "combined",
    srcs = [":greeting", "input.txt"],
    outs = ["combined.txt"],
    cmd = "cat $(SRCS) > $@ && wc -c $(SRCS) >> $@",
)
genrule(
    name = "big",
    srcs = [":combined"],
    outs = ["big.bin"],
    cmd = "(cat $(location :combined); head -c 3000000 /dev/zero | tr '\\\\0' z) > $@",
)
genrule(name = "empty", outs = ["empty.txt"], cmd = "touch $@")
"""
OUTPUTS = ["greeting.txt", "combined.txt", "big.bin", "empty.txt"]


def test_second_build_in_fresh_output_base_is_all_remote_cache_hits(
    service: RunningService, tmp_path: Path
) -> None:
    workspace = make_workspace(tmp_path, BUILD, {"input.txt": "an input file\n"})
    flags = [f"--remote_cache=grpc://{service.address}", "//:all"]

    first = Bazel(workspace, tmp_path / "root1")
    try:
        run = first.run("build", *flags)
        assert run.returncode == 0, run.output
        counts = run.process_counts()
        assert counts.get("remote cache hit", 0) == 0, run.output
        produced = {name: (workspace / "bazel-bin" / name).read_bytes() for name in OUTPUTS}
    finally:
        first.shutdown()

    second = Bazel(workspace, tmp_path / "root2")
    try:
        run = second.run("build", *flags)
        assert run.returncode == 0, run.output
        counts = run.process_counts()
        assert counts.get("remote cache hit") == len(OUTPUTS), run.output
        assert set(counts) <= {"remote cache hit", "internal"}, run.output
        again = {name: (workspace / "bazel-bin" / name).read_bytes() for name in OUTPUTS}
    finally:
        second.shutdown()

    assert again == produced
    assert len(produced["big.bin"]) > 500_000  # large enough to need several ByteStream chunks
