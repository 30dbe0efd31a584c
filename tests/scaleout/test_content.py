"""A worker fed by BuildGrid: results, metadata and content through BuildGrid's CAS."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from tests.execution_client import (
    execute,
    shell_action,
    stdout_of,
    upload_action,
)
from tests.images import IMAGE_A, IMAGE_B
from tests.reapi_client import bytestream_read, bytestream_write, upload_message
from tests.scaleout.conftest import StartWorker
from tests.scaleout.services import BuildGrid, wait_until
from worker.digests import Digest
from worker.reapi import error_details_pb2, re_pb2

pytestmark = [pytest.mark.docker]

MiB = 1 << 20


def test_an_action_runs_on_the_worker_in_the_image_it_names(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    worker = start_worker("one")
    with buildgrid.channel() as channel:
        for image, marker in ((IMAGE_A, "image-a"), (IMAGE_B, "image-b")):
            spec = shell_action("cat /etc/image-name; echo to-stderr >&2", image)
            response = execute(channel, upload_action(channel, spec)).response
            assert response.status.code == 0, response
            assert response.result.exit_code == 0
            assert stdout_of(channel, response) == f"{marker}\n".encode()
            metadata = response.result.execution_metadata
            assert metadata.worker == f"one-{worker.data_dir.parent.name}"
            assert metadata.worker_start_timestamp.ToNanoseconds() > 0
            assert (
                metadata.execution_start_timestamp.ToNanoseconds()
                >= metadata.input_fetch_start_timestamp.ToNanoseconds()
                >= metadata.worker_start_timestamp.ToNanoseconds()
            )
            assert (
                metadata.worker_completed_timestamp.ToNanoseconds()
                >= metadata.output_upload_completed_timestamp.ToNanoseconds()
                > 0
            )
    # The count goes up once BuildGrid has acknowledged the report, just after the client
    # heard of the result.
    wait_until(lambda: worker.status()["leases_completed"] == 2, 30, "the reports")
    status = worker.status()
    assert ["container-image", f"docker://{IMAGE_A}"] in status["offer"]["properties"]
    assert status["offer"]["capacity"] == 2


def test_large_inputs_and_outputs_travel_through_buildgrids_cas(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    """Blobs above the 4 MiB batch limit go over ByteStream both ways: a 6 MiB input from the
    client to BuildGrid to the worker, a 9 MiB output and a 5 MiB output tree file back."""
    start_worker("large")
    big_input = hashlib.sha256(b"seed").digest() * (6 * MiB // 32)
    with buildgrid.channel() as channel:
        bytestream_write(channel, big_input, chunk=MiB)
        # Built by hand: the input is in BuildGrid's CAS already (no batch could carry it).
        script = (
            "cat in.bin in.bin | head -c 9437184 > out.bin && mkdir -p tree/sub && "
            "head -c 5242880 in.bin > tree/sub/part.bin && sha256sum in.bin | cut -d' ' -f1"
        )
        command = re_pb2.Command(arguments=["sh", "-c", script], output_paths=["out.bin", "tree"])
        root = re_pb2.Directory(
            files=[re_pb2.FileNode(name="in.bin", digest=Digest.of(big_input).to_proto())]
        )
        action = re_pb2.Action(
            command_digest=upload_message(channel, command).to_proto(),
            input_root_digest=upload_message(channel, root).to_proto(),
            platform=re_pb2.Platform(
                properties=[
                    re_pb2.Platform.Property(name="container-image", value=f"docker://{IMAGE_A}")
                ]
            ),
        )
        response = execute(channel, upload_message(channel, action)).response
        assert response.status.code == 0, response
        assert response.result.exit_code == 0
        assert (
            stdout_of(channel, response).decode().strip() == hashlib.sha256(big_input).hexdigest()
        )
        (output,) = response.result.output_files
        data = bytestream_read(channel, Digest.from_proto(output.digest))
        assert data == (big_input + big_input)[: 9 * MiB]
        (directory,) = response.result.output_directories
        tree = re_pb2.Tree.FromString(
            bytestream_read(channel, Digest.from_proto(directory.tree_digest))
        )
        (sub,) = tree.children
        (part,) = sub.files
        assert bytestream_read(channel, Digest.from_proto(part.digest)) == big_input[: 5 * MiB]


def test_action_problems_reach_the_client_with_their_reapi_status(
    buildgrid: BuildGrid, start_worker: StartWorker
) -> None:
    """An input BuildGrid's CAS lacks is FAILED_PRECONDITION naming the blob (the client uploads
    it and retries); an image this worker does not allow is PERMISSION_DENIED. Neither is
    retried by BuildGrid."""
    start_worker(
        "problems", [IMAGE_A], 2, "--property", "container-image=docker://forbidden.invalid/x:1"
    )
    absent = b"never uploaded"
    with buildgrid.channel() as channel:
        command = re_pb2.Command(arguments=["cat", "in.txt"])
        root = re_pb2.Directory(
            files=[re_pb2.FileNode(name="in.txt", digest=Digest.of(absent).to_proto())]
        )
        action = re_pb2.Action(
            command_digest=upload_message(channel, command).to_proto(),
            input_root_digest=upload_message(channel, root).to_proto(),
            platform=re_pb2.Platform(
                properties=[
                    re_pb2.Platform.Property(name="container-image", value=f"docker://{IMAGE_A}")
                ]
            ),
            do_not_cache=True,
        )
        response = execute(channel, upload_message(channel, action)).response
        assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], response
        failure = error_details_pb2.PreconditionFailure()
        assert response.status.details[0].Unpack(failure)
        assert [(v.type, v.subject) for v in failure.violations] == [
            ("MISSING", Digest.of(absent).subject())
        ]

        # Offered with --property, so BuildGrid sends it here; execution.allowed_images refuses it.
        forbidden = shell_action("true", "forbidden.invalid/x:1", do_not_cache=True)
        response = execute(channel, upload_action(channel, forbidden)).response
        assert response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0], response
        assert "not allowed" in response.status.message
