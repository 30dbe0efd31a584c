"""Trees of any depth: an action's, or a crashed run's leftovers, never stop the service."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from tests.execution_client import (
    InputFile,
    execute,
    read_blob,
    run,
    stdout_of,
    upload_action,
)
from tests.reapi_client import bytestream_write, upload_message
from tests.security.conftest import Canary, attack_settings, hostile
from tests.serving import running_service
from worker.digests import Digest
from worker.execution.inputs import MAX_PARSED_BLOB_BYTES
from worker.reapi import re_pb2

pytestmark = pytest.mark.docker

# 1,600 levels in chunks of 100 (far past Python's recursion limit and the runner's scrub
# depth), in the action's own tree and in /tmp.
DEEP = r"""
chunk=$(i=0; while [ $i -lt 100 ]; do printf d/; i=$((i+1)); done)
for where in "$PWD" /tmp "$HOME"; do
  cd "$where"; n=0
  while [ $n -lt 16 ]; do mkdir -p "$chunk" && cd "$chunk" || exit 9; n=$((n+1)); done
  ln -s / escape; echo x > file
done
echo deep
"""


def plant_chain(parent: Path, name: str, depth: int, canary: Canary) -> None:
    """A directory chain `depth` deep, with links to the canary and to / along the way."""
    os.mkdir(parent / name)
    fd = os.open(parent / name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            if level % 100 == 0:
                os.symlink(str(canary.path), "leak", dir_fd=fd)
                os.symlink("/", "root", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_leftovers_of_any_depth_are_removed_at_start(
    tmp_path: Path, test_images: None, canary: Canary
) -> None:
    settings = attack_settings(tmp_path)
    exec_root = settings.exec_root
    for folder in ("sidecars", "trash", "actions"):
        (exec_root / folder).mkdir(parents=True, exist_ok=True)
        plant_chain(exec_root / folder, "leftover", 3000, canary)
    with running_service(settings) as service:
        response = run(service.channel, hostile("echo alive"))
        assert stdout_of(service.channel, response) == b"alive\n"
    assert not (exec_root / "actions").exists()
    assert list((exec_root / "trash").iterdir()) == []
    assert list((exec_root / "sidecars").iterdir()) == []
    canary.assert_untouched()


def test_an_action_that_builds_deep_trees_is_cleaned_up_and_the_service_restarts(
    tmp_path: Path, test_images: None, canary: Canary, dispatch: str
) -> None:
    settings = attack_settings(tmp_path, dispatch, max_sidecars=1)
    with running_service(settings) as service:
        deep = run(service.channel, hostile(DEEP))
        assert stdout_of(service.channel, deep) == b"deep\n"
        after = run(service.channel, hostile("ls -A /tmp | grep -c '^d$' || true"))
        assert stdout_of(service.channel, after) == b"0\n"
    # Restart on the same data directory: nothing of the deep trees is left, nothing breaks.
    with running_service(settings) as service:
        again = run(service.channel, hostile("echo again"))
        assert stdout_of(service.channel, again) == b"again\n"
    assert list((settings.exec_root / "sidecars").iterdir()) == []
    assert list((settings.exec_root / "trash").iterdir()) == []
    canary.assert_untouched()


def test_input_trees_deeper_than_the_limit_are_invalid(tmp_path: Path, test_images: None) -> None:
    settings = attack_settings(tmp_path, max_input_depth=8)
    with running_service(settings) as service:
        shallow = run(
            service.channel,
            hostile("cat " + "d/" * 7 + "f", files={"d/" * 7 + "f": InputFile(b"ok\n")}),
        )
        assert stdout_of(service.channel, shallow) == b"ok\n"
        deep = run(service.channel, hostile("true", files={"d/" * 9 + "f": InputFile(b"x")}))
        assert deep.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "max_input_depth" in deep.status.message


def oversized_directory() -> tuple[bytes, Digest]:
    """A Directory blob over MAX_PARSED_BLOB_BYTES (one file, padded with a node property)."""
    directory = re_pb2.Directory()
    node = directory.files.add(name="f", digest=Digest.of(b"x").to_proto())
    node.node_properties.properties.add(name="pad", value="p" * (MAX_PARSED_BLOB_BYTES + 1))
    data = directory.SerializeToString()
    return data, Digest.of(data)


def test_a_directory_blob_too_big_to_parse_safely_is_invalid_before_it_is_read(
    tmp_path: Path, test_images: None
) -> None:
    """A client uploads a Directory of gigabytes (ByteStream takes any size): parsing it would
    cost the worker several times that in memory. It is refused by its declared size."""
    data, digest = oversized_directory()
    with running_service(attack_settings(tmp_path)) as service:
        bytestream_write(service.channel, data, chunk=1 << 20)
        spec = hostile("true")
        action = re_pb2.Action.FromString(
            read_blob(service.channel, upload_action(service.channel, spec).to_proto())
        )
        action.input_root_digest.CopyFrom(digest.to_proto())
        store = service.service.storage.blobs
        read_before = store.counters.bytes_read
        response = execute(service.channel, upload_message(service.channel, action)).response
        assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "larger than" in response.status.message
        assert store.counters.bytes_read - read_before < MAX_PARSED_BLOB_BYTES


def test_an_action_blob_too_big_to_parse_safely_is_invalid_before_it_is_read(
    tmp_path: Path, test_images: None
) -> None:
    action = re_pb2.Action(salt=b"s" * (MAX_PARSED_BLOB_BYTES + 1))
    data = action.SerializeToString()
    with running_service(attack_settings(tmp_path)) as service:
        bytestream_write(service.channel, data, chunk=1 << 20)
        store = service.service.storage.blobs
        read_before = store.counters.bytes_read
        response = execute(service.channel, Digest.of(data)).response
        assert response.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "larger than" in response.status.message
        assert store.counters.bytes_read - read_before < MAX_PARSED_BLOB_BYTES
