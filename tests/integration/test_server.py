"""Capabilities, health, reflection, restart and the command line, over real gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.reapi_client import upload_batch
from tests.serving import RunningService, running_service
from worker.config import Settings
from worker.digests import Digest
from worker.reapi import re_grpc, re_pb2


def test_capabilities_advertise_sha256_batch_limit_and_cache_updates(
    service: RunningService,
) -> None:
    caps = re_grpc.CapabilitiesStub(service.channel).GetCapabilities(
        re_pb2.GetCapabilitiesRequest()
    )
    cache = caps.cache_capabilities
    assert list(cache.digest_function) == [re_pb2.DigestFunction.SHA256]
    assert cache.max_batch_total_size_bytes == (
        service.service.settings.storage.max_batch_total_size_bytes
    )
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.symlink_absolute_path_strategy == re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED
    assert (caps.low_api_version.major, caps.high_api_version.major) == (2, 2)
    assert caps.high_api_version.minor == 2


def test_health_check_reports_serving(service: RunningService) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    for name in ["", "build.bazel.remote.execution.v2.ContentAddressableStorage"]:
        response = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_reapi_services(service: RunningService) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in next(iter(responses)).list_services_response.service}
    assert {
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "build.bazel.remote.execution.v2.ActionCache",
        "google.bytestream.ByteStream",
    } <= names


def test_blobs_and_results_survive_a_restart(settings: Settings) -> None:
    with running_service(settings) as first:
        (digest,) = upload_batch(first.channel, b"kept across restarts")
        re_grpc.ActionCacheStub(first.channel).UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                action_digest=Digest.of(b"a").to_proto(),
                action_result=re_pb2.ActionResult(stdout_digest=digest.to_proto()),
            )
        )
    with running_service(settings) as second:
        result = re_grpc.ActionCacheStub(second.channel).GetActionResult(
            re_pb2.GetActionResultRequest(
                action_digest=Digest.of(b"a").to_proto(), inline_stdout=True
            )
        )
        assert result.stdout_raw == b"kept across restarts"


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", "serve", *args]


def test_command_logs_its_address_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with subprocess.Popen(
        serve_command("--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")),
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "serving" not in line:
            line = process.stderr.readline()
        assert "serving REAPI v2 on 127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopped" in process.stderr.read()


def test_command_with_invalid_configuration_exits_non_zero_naming_the_field(
    tmp_path: Path,
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("storage:\n  max_bytes: -5\n")
    result = subprocess.run(
        serve_command("--config", str(config)), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "storage.max_bytes" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_disk_full_is_resource_exhausted_and_the_store_stays_consistent(tmp_path: Path) -> None:
    from tests.reapi_client import bytestream_read, bytestream_write

    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        from worker.config import load_settings

        settings = load_settings(
            data_dir=mount, server={"listen": "127.0.0.1:0"}, execution={"enabled": False}
        )
        with running_service(settings) as service:
            small = b"fits" * 1000
            bytestream_write(service.channel, small)
            too_big = os.urandom(3 * 1024 * 1024)
            with pytest.raises(grpc.RpcError) as caught:
                bytestream_write(service.channel, too_big)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            missing = re_grpc.ContentAddressableStorageStub(service.channel).FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=[Digest.of(too_big).to_proto()])
            )
            assert len(missing.missing_blob_digests) == 1
            assert bytestream_read(service.channel, Digest.of(small)) == small
            service.service.storage.blobs.flush()  # `small` is a file, not one in the making
            leftovers = list((mount / "cas" / "tmp").iterdir())
            assert leftovers == []
            again = b"after the failure" * 100
            bytestream_write(service.channel, again)
            assert bytestream_read(service.channel, Digest.of(again)) == again
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
