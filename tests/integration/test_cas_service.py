"""The CAS over real gRPC on loopback."""

from __future__ import annotations

import grpc
import pytest

from tests.reapi_client import upload_batch, upload_message
from tests.serving import RunningService
from worker.digests import EMPTY_DIGEST, Digest
from worker.reapi import re_grpc, re_pb2


def cas(service: RunningService) -> re_grpc.ContentAddressableStorageStub:
    return re_grpc.ContentAddressableStorageStub(service.channel)


def test_find_missing_reports_only_absent_blobs_and_never_the_empty_blob(
    service: RunningService,
) -> None:
    (present,) = upload_batch(service.channel, b"present")
    absent = Digest.of(b"absent")
    response = cas(service).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(
            blob_digests=[present.to_proto(), absent.to_proto(), EMPTY_DIGEST.to_proto()]
        )
    )
    assert [Digest.from_proto(d) for d in response.missing_blob_digests] == [absent]


def test_batch_update_then_batch_read_round_trips(service: RunningService) -> None:
    blobs = [b"one", b"two", b""]
    digests = upload_batch(service.channel, *blobs)
    missing = Digest.of(b"never uploaded")
    response = cas(service).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for d in [*digests, missing]])
    )
    assert [(r.data, r.status.code) for r in response.responses] == [
        (b"one", 0),
        (b"two", 0),
        (b"", 0),
        (b"", grpc.StatusCode.NOT_FOUND.value[0]),
    ]


def test_batch_update_with_wrong_digest_fails_only_that_blob(service: RunningService) -> None:
    good = Digest.of(b"good")
    response = cas(service).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(
            requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=good.to_proto(), data=b"good"),
                re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=Digest.of(b"claimed").to_proto(), data=b"actual"
                ),
            ]
        )
    )
    codes = [r.status.code for r in response.responses]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    missing = cas(service).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[Digest.of(b"claimed").to_proto()])
    )
    assert len(missing.missing_blob_digests) == 1


def test_batch_over_the_advertised_limit_is_invalid_argument(service: RunningService) -> None:
    limit = service.service.settings.storage.max_batch_total_size_bytes
    data = b"z" * (limit + 1)
    with pytest.raises(grpc.RpcError) as caught:
        cas(service).BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(
                        digest=Digest.of(data).to_proto(), data=data
                    )
                ]
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_total_size_bytes" in (caught.value.details() or "")


def test_batch_read_over_the_advertised_limit_is_invalid_argument(
    service: RunningService,
) -> None:
    """REAPI, BatchReadBlobs: `INVALID_ARGUMENT`: "The client attempted to read more than
    the server supported limit"."""
    limit = service.service.settings.storage.max_batch_total_size_bytes
    halves = [b"x" * (limit // 2 + 1), b"y" * (limit // 2 + 1)]
    digests = upload_batch(service.channel, halves[0]), upload_batch(service.channel, halves[1])
    with pytest.raises(grpc.RpcError) as caught:
        cas(service).BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for (d,) in digests])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_batch_total_size_bytes" in (caught.value.details() or "")


def batch_request(
    method: str, digests: list[re_pb2.Digest]
) -> re_pb2.FindMissingBlobsRequest | re_pb2.BatchReadBlobsRequest | re_pb2.BatchUpdateBlobsRequest:
    if method == "FindMissingBlobs":
        return re_pb2.FindMissingBlobsRequest(blob_digests=digests)
    if method == "BatchReadBlobs":
        return re_pb2.BatchReadBlobsRequest(digests=digests)
    return re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b"x") for d in digests]
    )


BATCH_METHODS = ["FindMissingBlobs", "BatchReadBlobs", "BatchUpdateBlobs"]


@pytest.mark.parametrize("method", BATCH_METHODS)
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (re_pb2.Digest(hash="abc", size_bytes=3), "64 lowercase hex"),
        (re_pb2.Digest(hash="A" * 64, size_bytes=3), "64 lowercase hex"),
        (re_pb2.Digest(hash="a" * 64, size_bytes=-1), "negative"),
    ],
    ids=["short", "uppercase", "negative-size"],
)
def test_a_malformed_digest_among_good_ones_fails_the_whole_batch(
    service: RunningService, method: str, bad: re_pb2.Digest, message: str
) -> None:
    """One malformed digest in a batch of thousands is found (they are checked together) and
    fails the call with INVALID_ARGUMENT naming it, before anything is stored or read. (Errors
    of well formed digests stay per entry: not found, damaged, data that does not match.)"""
    good = [Digest.of(str(i).encode()).to_proto() for i in range(2000)]
    with pytest.raises(grpc.RpcError) as caught:
        getattr(cas(service), method)(batch_request(method, [*good[:1000], bad, *good[1000:]]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    if method == "BatchUpdateBlobs":  # nothing of the batch was stored
        stored = Digest.of(b"x").to_proto()
        missing = cas(service).FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(blob_digests=[stored])
        )
        assert list(missing.missing_blob_digests) == [stored]


def make_tree(service: RunningService, width: int) -> tuple[Digest, int]:
    """A root holding `width` subdirectories, each holding the same empty subdirectory.
    Returns the root and the number of distinct directories."""
    leaf = upload_message(service.channel, re_pb2.Directory())
    middles = []
    for i in range(width):
        middle = re_pb2.Directory(
            files=[re_pb2.FileNode(name=f"f{i}", digest=EMPTY_DIGEST.to_proto())],
            directories=[re_pb2.DirectoryNode(name="leaf", digest=leaf.to_proto())],
        )
        middles.append(upload_message(service.channel, middle))
    root = re_pb2.Directory(
        directories=[
            re_pb2.DirectoryNode(name=f"d{i:03}", digest=d.to_proto())
            for i, d in enumerate(middles)
        ]
    )
    return upload_message(service.channel, root), 1 + width + 1


def test_get_tree_streams_every_directory_in_pages_of_page_size(service: RunningService) -> None:
    """REAPI GetTree returns "every node descended from the root" and `page_size` is "A maximum
    page size": one call streams them all, at most page_size per response, a next_page_token
    on every response but the last. A directory shared by several parents comes once."""
    root, count = make_tree(service, width=7)
    responses = list(
        cas(service).GetTree(re_pb2.GetTreeRequest(root_digest=root.to_proto(), page_size=4))
    )
    assert [len(r.directories) for r in responses] == [4, 4, 1]
    assert [bool(r.next_page_token) for r in responses] == [True, True, False]
    seen = [d for r in responses for d in r.directories]
    assert len(seen) == count
    assert len(seen[0].directories) == 7  # breadth first: the root comes first
    assert seen[-1] == re_pb2.Directory()  # the shared empty leaf, once


def test_get_tree_sends_each_shared_subtree_once(service: RunningService) -> None:
    """40 levels whose directory names the next level twice: 2**40 paths but 41 distinct
    directories, so the stream ends after 41 (instead of never)."""
    below = upload_message(service.channel, re_pb2.Directory())
    for level in range(40):
        node = re_pb2.Directory(
            directories=[re_pb2.DirectoryNode(name=name, digest=below.to_proto()) for name in "ab"],
            files=[re_pb2.FileNode(name=f"level{level}", digest=EMPTY_DIGEST.to_proto())],
        )
        below = upload_message(service.channel, node)
    responses = list(
        cas(service).GetTree(re_pb2.GetTreeRequest(root_digest=below.to_proto()), timeout=30)
    )
    assert sum(len(r.directories) for r in responses) == 41


def test_get_tree_of_missing_root_is_not_found(service: RunningService) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(cas(service).GetTree(re_pb2.GetTreeRequest(root_digest=Digest.of(b"?").to_proto())))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_get_tree_with_forged_page_token_is_invalid_argument(service: RunningService) -> None:
    root, _ = make_tree(service, width=1)
    with pytest.raises(grpc.RpcError) as caught:
        list(
            cas(service).GetTree(
                re_pb2.GetTreeRequest(root_digest=root.to_proto(), page_token="garbage!")
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
