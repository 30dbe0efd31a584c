"""Blob files damaged on disk under a running service (truncated, a byte flipped, replaced
with another blob's bytes) are never served as valid: reads end in DATA_LOSS and the blob is
missing from then on; an action result that names one is a miss; `sidecar-executor cas
verify`, run beside the serving service, finds and removes them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.execution_client import InputFile, execute, shell_action, stdout_of, upload_action
from tests.images import IMAGE_A
from tests.reapi_client import bytestream_read, bytestream_write, upload_batch
from tests.serving import RunningService
from tests.unit.test_cas_integrity import DAMAGE
from worker.digests import Digest
from worker.reapi import error_details_pb2, re_grpc, re_pb2

REPO = Path(__file__).resolve().parents[2]
DATA_LOSS = grpc.StatusCode.DATA_LOSS


def blob_file(service: RunningService, digest: Digest) -> Path:
    return service.service.storage.blobs.blob_path(digest)


def find_missing(service: RunningService, digests: list[Digest]) -> list[Digest]:
    response = re_grpc.ContentAddressableStorageStub(service.channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto() for d in digests])
    )
    return [Digest.from_proto(d) for d in response.missing_blob_digests]


def two_blobs(size: int) -> tuple[bytes, bytes]:
    return os.urandom(size), os.urandom(size)


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("size", [1000, 5 * 1024 * 1024 + 3])
def test_bytestream_read_of_a_damaged_blob_is_data_loss_then_not_found(
    service: RunningService, damage: str, size: int
) -> None:
    data, other = two_blobs(size)
    bytestream_write(service.channel, data)
    digest = Digest.of(data)
    DAMAGE[damage](blob_file(service, digest), other)
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_read(service.channel, digest)
    assert caught.value.code() == DATA_LOSS
    assert find_missing(service, [digest]) == [digest]
    with pytest.raises(grpc.RpcError) as again:
        bytestream_read(service.channel, digest)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    bytestream_write(service.channel, data)  # a client that uploads it again is served
    assert bytestream_read(service.channel, digest) == data


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_read_from_an_offset_of_a_damaged_blob_is_data_loss(
    service: RunningService, damage: str
) -> None:
    data, other = two_blobs(3 * 1024 * 1024)
    bytestream_write(service.channel, data)
    digest = Digest.of(data)
    assert bytestream_read(service.channel, digest, offset=100, limit=50) == data[100:150]
    DAMAGE[damage](blob_file(service, digest), other)
    with pytest.raises(grpc.RpcError) as caught:
        bytestream_read(service.channel, digest, offset=2 * 1024 * 1024, limit=10)
    assert caught.value.code() == DATA_LOSS
    assert find_missing(service, [digest]) == [digest]


@pytest.mark.parametrize("damage", DAMAGE)
def test_batch_read_reports_data_loss_for_the_damaged_blob_only(
    service: RunningService, damage: str
) -> None:
    good, bad = upload_batch(service.channel, b"good blob bytes", b"bad blob bytes!")
    DAMAGE[damage](blob_file(service, bad), b"some other bytes")
    response = re_grpc.ContentAddressableStorageStub(service.channel).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[good.to_proto(), bad.to_proto()])
    )
    assert [(r.status.code, r.data) for r in response.responses] == [
        (0, b"good blob bytes"),
        (DATA_LOSS.value[0], b""),
    ]
    assert find_missing(service, [good, bad]) == [bad]


def test_an_action_result_naming_a_damaged_output_is_a_miss(service: RunningService) -> None:
    out, stdout = upload_batch(service.channel, b"output bytes", b"stdout bytes")
    action = Digest.of(b"an action")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out", digest=out.to_proto())],
        stdout_digest=stdout.to_proto(),
    )
    cache = re_grpc.ActionCacheStub(service.channel)
    cache.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=action.to_proto(), action_result=result)
    )
    request = re_pb2.GetActionResultRequest(action_digest=action.to_proto())
    assert cache.GetActionResult(request) == result
    DAMAGE["flipped byte"](blob_file(service, out), b"")
    with pytest.raises(grpc.RpcError) as caught:
        cache.GetActionResult(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert find_missing(service, [out, stdout]) == [out]


def run_verify(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "cas", "verify", "--data-dir", str(data_dir), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_cas_verify_beside_the_serving_service_removes_exactly_the_damaged_blobs(
    service: RunningService,
) -> None:
    blobs = [os.urandom(2000 + i) for i in range(30)]
    digests = upload_batch(service.channel, *blobs)
    large = os.urandom(3 * 1024 * 1024)
    bytestream_write(service.channel, large)
    digests.append(Digest.of(large))
    service.service.storage.blobs.flush()
    damaged = {
        digests[3]: "flipped byte",
        digests[7]: "truncated",
        digests[-1]: "another blob's bytes",
    }
    for digest, damage in damaged.items():
        DAMAGE[damage](blob_file(service, digest), blobs[0])
    data_dir = service.service.settings.data_dir

    dry = run_verify(data_dir, "--dry-run")
    assert dry.returncode == 1, dry.stderr
    assert all(blob_file(service, d).exists() for d in damaged)

    checked = run_verify(data_dir)
    assert checked.returncode == 1, checked.stderr
    assert "verified 31/31 files" in checked.stderr  # progress
    assert sorted(
        line for line in checked.stdout.splitlines() if line.startswith("damaged:")
    ) == sorted(f"damaged: blobs/{d.hash[:2]}/{d.hash} (removed)" for d in damaged)
    assert "checked 31 files" in checked.stdout and "3 damaged (removed)" in checked.stdout
    # The service keeps serving; what verify removed reads as missing, the rest is intact.
    for digest, data in zip(digests, [*blobs, large], strict=True):
        if digest in damaged:
            with pytest.raises(grpc.RpcError) as caught:
                bytestream_read(service.channel, digest)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        else:
            assert bytestream_read(service.channel, digest) == data
    assert sorted(find_missing(service, digests), key=str) == sorted(damaged, key=str)
    clean = run_verify(data_dir, "--quiet")
    assert clean.returncode == 0 and "0 damaged" in clean.stdout and clean.stderr == ""


def test_cas_verify_of_a_directory_without_a_cas_says_so(tmp_path: Path) -> None:
    result = run_verify(tmp_path / "nothing-here")
    assert result.returncode == 2
    assert "holds no CAS" in result.stderr


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_action_whose_input_was_damaged_fails_with_a_missing_violation_not_a_wrong_build(
    exec_service: RunningService, damage: str
) -> None:
    """Real Docker: the same action runs once, its input file is then damaged on disk, and
    the next run is refused before anything runs, naming that blob; once the client uploads
    the blob again the action runs on the right bytes."""
    content = b"the right input bytes\n" * 50
    spec = shell_action("cat input.txt", IMAGE_A, files={"input.txt": InputFile(content)})
    action = upload_action(exec_service.channel, spec)
    first = execute(exec_service.channel, action).response
    assert first.status.code == 0 and first.result.exit_code == 0
    assert stdout_of(exec_service.channel, first) == content
    blob = Digest.of(content)
    DAMAGE[damage](blob_file(exec_service, blob), b"the wrong input bytes\n" * 50)

    second = execute(exec_service.channel, action).response
    assert second.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    failure = error_details_pb2.PreconditionFailure()
    assert second.status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("MISSING", blob.subject())]
    assert find_missing(exec_service, [blob]) == [blob]

    upload_batch(exec_service.channel, content)
    third = execute(exec_service.channel, action).response
    assert third.status.code == 0 and stdout_of(exec_service.channel, third) == content
