"""GetTree over real gRPC on loopback, for a tree too big for one message.

REAPI v2 `ContentAddressableStorage.GetTree`: "Fetch the entire directory tree rooted at a
node ... The server will enumerate the `Directory` tree recursively and return every node
descended from the root", and `page_token` "can be used to skip ahead in the stream (e.g. when
retrying a partially completed and aborted request), by setting it to a value taken from
GetTreeResponse.next_page_token of the last successfully processed GetTreeResponse";
`GetTreeRequest.page_size` is "A maximum page size"; `GetTreeResponse.next_page_token`: "If
empty, signifies that this is the last page of results"; errors: "`NOT_FOUND`: The requested
tree root is not present in the CAS". Our protos/.../remote_execution.proto: "Every Directory
under a root, breadth first, in pages."

The client here keeps gRPC's default 4 MiB receive limit, as Bazel and most clients do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.reapi_client import upload_batch
from tests.serving import RunningService
from worker.digests import Digest
from worker.reapi import re_grpc, re_pb2
from worker.server.cas import ContentAddressableStorageServicer

DEFAULT_RECEIVE_LIMIT = 4 * 1024 * 1024
MIDDLES, LEAVES_PER_MIDDLE, FILES_PER_LEAF = 20, 30, 60


@dataclass
class BigTree:
    root: Digest
    directories: set[Digest]  # every Directory in the tree, the root included
    serialized_bytes: int


def _digest_of(directory: re_pb2.Directory) -> Digest:
    return Digest.of(directory.SerializeToString())


def _file(name: str) -> re_pb2.FileNode:
    return re_pb2.FileNode(name=name, digest=Digest.of(name.encode()).to_proto())


@pytest.fixture
def big_tree(service: RunningService) -> BigTree:
    """621 distinct directories (root, 20 middles, 600 leaves of 60 long-named files each),
    about 6 MB serialized: more than one 4 MiB message."""
    blobs: list[bytes] = []
    middles = []
    for m in range(MIDDLES):
        leaves = []
        for leaf in range(LEAVES_PER_MIDDLE):
            files = [
                _file(f"m{m:02}-l{leaf:02}-f{f:02}-" + "n" * 80) for f in range(FILES_PER_LEAF)
            ]
            directory = re_pb2.Directory(files=files)
            blobs.append(directory.SerializeToString())
            leaves.append(
                re_pb2.DirectoryNode(name=f"l{leaf:02}", digest=_digest_of(directory).to_proto())
            )
        middle = re_pb2.Directory(directories=leaves)
        blobs.append(middle.SerializeToString())
        middles.append(re_pb2.DirectoryNode(name=f"m{m:02}", digest=_digest_of(middle).to_proto()))
    root = re_pb2.Directory(directories=middles)
    blobs.append(root.SerializeToString())
    upload_batch(service.channel, *blobs)
    tree = BigTree(
        root=Digest.of(blobs[-1]),
        directories={Digest.of(b) for b in blobs},
        serialized_bytes=sum(len(b) for b in blobs),
    )
    assert len(tree.directories) == 1 + MIDDLES + MIDDLES * LEAVES_PER_MIDDLE > 600
    assert tree.serialized_bytes > DEFAULT_RECEIVE_LIMIT
    return tree


@pytest.fixture
def default_client(service: RunningService) -> Iterator[re_grpc.ContentAddressableStorageStub]:
    """A CAS client with gRPC's default limits (4 MiB received messages)."""
    channel = grpc.insecure_channel(service.address)
    try:
        yield re_grpc.ContentAddressableStorageStub(channel)
    finally:
        channel.close()


def get_tree(
    client: re_grpc.ContentAddressableStorageStub,
    root: Digest,
    page_size: int = 0,
    page_token: str = "",
) -> Any:
    return client.GetTree(
        re_pb2.GetTreeRequest(
            root_digest=root.to_proto(), page_size=page_size, page_token=page_token
        ),
        timeout=60,
    )


def directories_of(responses: list[re_pb2.GetTreeResponse]) -> list[Digest]:
    return [_digest_of(d) for r in responses for d in r.directories]


def test_one_call_streams_the_whole_tree_in_messages_a_default_client_accepts(
    big_tree: BigTree, default_client: re_grpc.ContentAddressableStorageStub
) -> None:
    responses = list(get_tree(default_client, big_tree.root))
    assert len(responses) >= 2
    assert all(r.ByteSize() < DEFAULT_RECEIVE_LIMIT for r in responses)
    got = directories_of(responses)
    assert len(got) == len(big_tree.directories)
    assert set(got) == big_tree.directories
    assert got[0] == big_tree.root  # breadth first
    assert all(r.next_page_token for r in responses[:-1])
    assert responses[-1].next_page_token == ""


def test_page_size_is_a_maximum_per_response_within_one_call(
    big_tree: BigTree, default_client: re_grpc.ContentAddressableStorageStub
) -> None:
    responses = list(get_tree(default_client, big_tree.root, page_size=50))
    assert all(0 < len(r.directories) <= 50 for r in responses)
    assert len(responses) == -(-len(big_tree.directories) // 50)
    assert set(directories_of(responses)) == big_tree.directories


def test_page_token_resumes_a_stream_that_stopped_early(
    big_tree: BigTree, default_client: re_grpc.ContentAddressableStorageStub
) -> None:
    stream = get_tree(default_client, big_tree.root, page_size=100)
    first = [next(stream), next(stream)]
    stream.cancel()
    rest = list(get_tree(default_client, big_tree.root, page_token=first[-1].next_page_token))
    before, after = directories_of(first), directories_of(rest)
    assert len(before) == 200
    assert not set(before) & set(after)
    assert set(before) | set(after) == big_tree.directories
    assert len(before) + len(after) == len(big_tree.directories)
    assert rest[-1].next_page_token == ""


@pytest.mark.parametrize("token", ["garbage!", "dHJlZTp4OjE=", "tree-from-another-root"])
def test_page_token_not_issued_for_this_root_is_invalid_argument(
    big_tree: BigTree,
    default_client: re_grpc.ContentAddressableStorageStub,
    service: RunningService,
    token: str,
) -> None:
    if token == "tree-from-another-root":
        (other,) = upload_batch(
            service.channel,
            re_pb2.Directory(
                directories=[re_pb2.DirectoryNode(name="x", digest=big_tree.root.to_proto())]
            ).SerializeToString(),
        )
        token = next(get_tree(default_client, other, page_size=1)).next_page_token
        assert token
    with pytest.raises(grpc.RpcError) as caught:
        list(get_tree(default_client, big_tree.root, page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_missing_root_is_not_found(
    default_client: re_grpc.ContentAddressableStorageStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(get_tree(default_client, Digest.of(b"no such directory")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.anyio
async def test_responses_stay_under_a_server_message_limit_below_4_mib(
    big_tree: BigTree, service: RunningService
) -> None:
    """With server.max_message_bytes at its 1 MiB minimum every response still fits it."""
    limit = 1024 * 1024
    servicer = ContentAddressableStorageServicer(
        service.service.storage.blobs, 64 * 1024, max_message_bytes=limit
    )
    request = re_pb2.GetTreeRequest(root_digest=big_tree.root.to_proto())
    responses = [r async for r in servicer.GetTree(request, None)]  # type: ignore[arg-type]
    assert len(responses) >= 6
    assert all(r.ByteSize() <= limit for r in responses)
    assert set(directories_of(responses)) == big_tree.directories
