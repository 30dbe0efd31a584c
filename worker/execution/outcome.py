"""How an operation ended, in words for the metrics: cached, success, exit_nonzero or error,
and the ExecuteResponse's status code name."""

from __future__ import annotations

import grpc

from worker.reapi import re_pb2

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def outcome_of(response: re_pb2.ExecuteResponse) -> tuple[str, str]:
    status = _CODE_NAMES.get(response.status.code, str(response.status.code))
    if response.status.code != 0:
        return "error", status
    if response.cached_result:
        return "cached", status
    return ("success" if response.result.exit_code == 0 else "exit_nonzero"), status
