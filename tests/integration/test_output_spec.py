"""Output kinds as the REAPI comments on Command and ActionResult define them, on the real daemon.

ActionResult.output_files: "If an output listed in `output_files` was found, but was a directory
rather than a regular file, the server will return a FAILED_PRECONDITION." output_file_symlinks:
"If an output symbolic link of the same name as listed in `output_files` of the Command was
found, but its target type was not a regular file, the server will return a
FAILED_PRECONDITION." output_symlinks (v2.1, `output_paths`): "A single entry for each output
requested in `output_paths` field of the Action, if the corresponding path existed after the
action completed and was a symbolic link." SymlinkAbsolutePathStrategy DISALLOWED: "If an action
tries to create an output symlink with an absolute target, a FAILED_PRECONDITION will be
returned."
"""

from __future__ import annotations

import grpc
import pytest

from tests.execution_client import run, shell_action
from tests.images import IMAGE_A
from tests.serving import RunningService

pytestmark = pytest.mark.docker

OK = grpc.StatusCode.OK.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@pytest.mark.parametrize(
    ("script", "fields", "expected"),
    [
        ("ln -s missing out", {"output_files": ["out"]}, FAILED_PRECONDITION),
        ("mkdir out", {"output_files": ["out"]}, FAILED_PRECONDITION),
        ("mkdir d; ln -s d out", {"output_files": ["out"]}, FAILED_PRECONDITION),
        ("echo x > out", {"output_directories": ["out"]}, FAILED_PRECONDITION),
        ("echo x > f; ln -s f out", {"output_directories": ["out"]}, FAILED_PRECONDITION),
        ("ln -s /etc/passwd out", {"output_paths": ["out"]}, FAILED_PRECONDITION),
        ("mkdir out; ln -s /etc out/abs", {"output_directories": ["out"]}, FAILED_PRECONDITION),
        ("ln -s missing out", {"output_paths": ["out"]}, OK),
        ("ln -s missing out", {"output_directories": ["other"]}, OK),
    ],
)
def test_output_kinds_follow_the_spec(
    exec_service: RunningService, script: str, fields: dict[str, list[str]], expected: int
) -> None:
    response = run(exec_service.channel, shell_action(script, IMAGE_A, **fields))
    assert response.status.code == expected, response.status


def test_symlinks_to_the_right_kind_are_returned_as_symlinks(exec_service: RunningService) -> None:
    script = "mkdir -p d/sub; echo x > d/f; ln -s d/f file-link; ln -s ../d/sub d/dir-link"
    legacy = run(
        exec_service.channel,
        shell_action(
            script, IMAGE_A, output_files=["file-link"], output_directories=["d/dir-link"]
        ),
    )
    assert legacy.status.code == OK, legacy.status
    assert [(s.path, s.target) for s in legacy.result.output_file_symlinks] == [
        ("file-link", "d/f")
    ]
    assert [(s.path, s.target) for s in legacy.result.output_directory_symlinks] == [
        ("d/dir-link", "../d/sub")
    ]
    dangling = run(
        exec_service.channel, shell_action("ln -s nowhere out", IMAGE_A, output_paths=["out"])
    )
    assert [(s.path, s.target) for s in dangling.result.output_symlinks] == [("out", "nowhere")]
