"""A hostile client that makes a small batch request cost a large answer.

An empty `Digest` is two bytes of a batch request; answering it in its own entry (the digest
echoed, a status code, a message) costs some seventy bytes of response and microseconds of
work. Before malformed digests failed the whole call, a 2 MB `BatchUpdateBlobs` or
`BatchReadBlobs` of them cost the service a 69 MB response, 12-18 s of CPU and over 1 GiB of
memory (measured). Now the first malformed digest ends the call with INVALID_ARGUMENT,
before anything is read or stored; errors of well formed digests (not found, damaged, data
that does not match) stay per entry, and each of those costs the client a 64-character hash.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import Message

from tests.serving import RunningService
from worker.reapi import re_grpc, re_pb2

# Two bytes each on the wire: about 400 KB of request. Answered entry by entry, the response
# would be ~14 MB (still under the service's 16 MiB message limit, so the call would succeed).
ENTRIES = 200_000


def requests() -> dict[str, Message]:
    empty = [re_pb2.Digest() for _ in range(ENTRIES)]
    return {
        "BatchReadBlobs": re_pb2.BatchReadBlobsRequest(digests=empty),
        "BatchUpdateBlobs": re_pb2.BatchUpdateBlobsRequest(
            requests=[re_pb2.BatchUpdateBlobsRequest.Request() for _ in range(ENTRIES)]
        ),
        "FindMissingBlobs": re_pb2.FindMissingBlobsRequest(blob_digests=empty),
    }


@pytest.mark.parametrize("method", ["BatchReadBlobs", "BatchUpdateBlobs", "FindMissingBlobs"])
def test_a_batch_of_malformed_digests_is_refused_whole_not_answered_entry_by_entry(
    service: RunningService, method: str
) -> None:
    request = requests()[method]
    assert len(request.SerializeToString()) < 3 * ENTRIES
    with pytest.raises(grpc.RpcError) as caught:
        getattr(re_grpc.ContentAddressableStorageStub(service.channel), method)(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 lowercase hex" in (caught.value.details() or "")
    # The service is not busy with it afterwards: the next call is answered.
    answer = re_grpc.ContentAddressableStorageStub(service.channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest()
    )
    assert list(answer.missing_blob_digests) == []
