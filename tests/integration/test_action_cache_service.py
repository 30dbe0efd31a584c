"""ActionCache over real gRPC on loopback."""

from __future__ import annotations

import grpc
import pytest

from tests.reapi_client import upload_batch
from tests.serving import RunningService
from worker.digests import Digest
from worker.reapi import re_grpc, re_pb2

ACTION = Digest.of(b"some action")


def stored_result(service: RunningService) -> re_pb2.ActionResult:
    out, stdout, stderr = upload_batch(service.channel, b"file bytes", b"hello\n", b"warn\n")
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="out/a.txt", digest=out.to_proto())],
        stdout_digest=stdout.to_proto(),
        stderr_digest=stderr.to_proto(),
        exit_code=0,
    )
    re_grpc.ActionCacheStub(service.channel).UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=ACTION.to_proto(), action_result=result)
    )
    return result


def test_get_returns_what_update_stored(service: RunningService) -> None:
    result = stored_result(service)
    got = re_grpc.ActionCacheStub(service.channel).GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=ACTION.to_proto())
    )
    assert got == result
    assert got.stdout_raw == b""


def test_inline_flags_fill_stdout_stderr_and_named_files(service: RunningService) -> None:
    stored_result(service)
    got = re_grpc.ActionCacheStub(service.channel).GetActionResult(
        re_pb2.GetActionResultRequest(
            action_digest=ACTION.to_proto(),
            inline_stdout=True,
            inline_stderr=True,
            inline_output_files=["out/a.txt"],
        )
    )
    assert (got.stdout_raw, got.stderr_raw) == (b"hello\n", b"warn\n")
    assert got.output_files[0].contents == b"file bytes"


def test_unknown_action_is_not_found(service: RunningService) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        re_grpc.ActionCacheStub(service.channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=Digest.of(b"other").to_proto())
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
