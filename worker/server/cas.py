"""ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree."""

from __future__ import annotations

import base64
import sys
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from worker.cas import io_threads
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest, check_well_formed
from worker.errors import OK_STATUS, InvalidArgument, NotFound, to_status_proto
from worker.reapi import re_grpc, re_pb2
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]

MiB = 1024 * 1024
# gRPC clients accept 4 MiB messages unless configured otherwise (Bazel, the Go and Java
# stacks, grpcio): a GetTree response must fit that as well as the server's own limit.
CLIENT_DEFAULT_RECEIVE_BYTES = 4 * MiB
# Room for the response's own framing and its next_page_token.
GET_TREE_MARGIN_BYTES = 64 * 1024


# A malformed digest (not 64 lowercase hex characters, or a negative size) fails a whole
# batch call with INVALID_ARGUMENT, checked before anything is read or stored, rather than
# only its own entry: a malformed entry can be two bytes of request, and its status (the
# digest echoed, a code, a message) some seventy bytes of response and microseconds of work,
# so answering them one by one let a 2 MB request cost a 69 MB response, 12-18 s of CPU and
# over 1 GiB of memory (measured). Errors of well formed digests (not found, damaged, data
# that does not match) stay per entry, as REAPI asks; their entries cost at least the 64
# characters of a hash in the request.


def _check_batch_size(total: int, limit: int) -> None:
    if total > limit:
        raise InvalidArgument(
            f"batch of {total} bytes exceeds max_batch_total_size_bytes ({limit}); "
            "use ByteStream for large blobs"
        )


class ContentAddressableStorageServicer(re_grpc.ContentAddressableStorageServicer):
    def __init__(
        self,
        store: DiskBlobStore,
        max_batch_total_size_bytes: int,
        max_message_bytes: int = CLIENT_DEFAULT_RECEIVE_BYTES,
    ) -> None:
        self._store = store
        self._max_batch = max_batch_total_size_bytes
        # Largest sum of directory fields in one GetTree response.
        self._tree_budget = (
            min(max_message_bytes, CLIENT_DEFAULT_RECEIVE_BYTES) - GET_TREE_MARGIN_BYTES
        )

    @rpc_errors
    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: Context
    ) -> re_pb2.FindMissingBlobsResponse:
        # In a thread: checking thousands of digests is work the event loop should not wait
        # on, and the index's lock may be held by a writer renaming files into place.
        return await io_threads.run(self._find_missing, request)

    def _find_missing(
        self, request: re_pb2.FindMissingBlobsRequest
    ) -> re_pb2.FindMissingBlobsResponse:
        protos = list(request.blob_digests)
        digests = Digest.many([p.hash for p in protos], [p.size_bytes for p in protos])
        present = self._store.present(digests)
        # The request's own messages go back (no new ones to build), in the request's order.
        return re_pb2.FindMissingBlobsResponse(
            missing_blob_digests=[
                proto for proto, here in zip(protos, present, strict=True) if not here
            ]
        )

    @rpc_errors
    async def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: Context
    ) -> re_pb2.BatchUpdateBlobsResponse:
        # The whole batch is one worker thread call: reading its fields out of the request
        # copies every blob, which the event loop should not spend its time on either.
        return await io_threads.run(self._update_all, request)

    def _update_all(
        self, request: re_pb2.BatchUpdateBlobsRequest
    ) -> re_pb2.BatchUpdateBlobsResponse:
        """Every blob checked against its declared digest and stored. A digest that does not
        match its data fails that blob alone (INVALID_ARGUMENT in its status, as REAPI says);
        a malformed digest fails the whole call, as in the other batch calls (why: the note
        above _check_batch_size)."""
        hashes: list[str] = []
        sizes: list[int] = []
        datas: list[bytes] = []
        for item in request.requests:
            digest = item.digest
            hashes.append(digest.hash)
            sizes.append(digest.size_bytes)
            datas.append(item.data)
        check_well_formed(hashes, sizes)
        _check_batch_size(sum(map(len, datas)), self._max_batch)
        results = self._store.put_many(list(zip(hashes, sizes, datas, strict=True)))
        response = re_pb2.BatchUpdateBlobsResponse()
        answer = re_pb2.BatchUpdateBlobsResponse.Response
        response.responses.extend(
            [
                answer(
                    digest=item.digest,
                    status=OK_STATUS if failure is None else to_status_proto(failure),
                )
                for item, failure in zip(request.requests, results, strict=True)
            ]
        )
        return response

    @rpc_errors
    async def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: Context
    ) -> re_pb2.BatchReadBlobsResponse:
        return await io_threads.run(self._read_all, request)

    def _read_all(self, request: re_pb2.BatchReadBlobsRequest) -> re_pb2.BatchReadBlobsResponse:
        """Every blob read and checked against its digest (a damaged one is DATA_LOSS, a
        missing one NOT_FOUND, each in its own status). A malformed digest fails the whole
        call (why: the note above _check_batch_size)."""
        protos = list(request.digests)
        digests = Digest.many([p.hash for p in protos], [p.size_bytes for p in protos])
        _check_batch_size(sum(d.size for d in digests), self._max_batch)
        response = re_pb2.BatchReadBlobsResponse()
        for proto, result in zip(protos, self._store.read_many(digests), strict=True):
            if isinstance(result, bytes):
                response.responses.add(digest=proto, data=result, status=OK_STATUS)
            else:
                response.responses.add(digest=proto, status=to_status_proto(result))
        return response

    @rpc_errors
    async def GetTree(
        self, request: re_pb2.GetTreeRequest, context: Context
    ) -> AsyncIterator[re_pb2.GetTreeResponse]:
        """Streams every distinct Directory under the root, breadth first, in as many
        responses as it takes; see `TreeWalk` for the order and `_tree_budget` for sizes.

        `page_size` caps the directories in each response (0: only the byte budget does).
        Every response but the last carries a `next_page_token`; the last carries none, which
        marks the end of the tree. A client whose stream broke can call again with the token
        of the last response it processed and gets the rest (REAPI: the token is used "to skip
        ahead in the stream (e.g. when retrying a partially completed and aborted request)").
        A client that stops reading early can do the same. A token is bound to its root: any
        other token, or one pointing past the end of the tree, is INVALID_ARGUMENT. A missing
        root is NOT_FOUND; missing directories below it are left out, as the spec says.
        """
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        root = Digest.from_proto(request.root_digest)
        start = _decode_page_token(request.page_token, root)
        most = request.page_size or sys.maxsize
        walk = TreeWalk(self._store, root)
        await io_threads.run(walk.skip, start)
        while True:
            page = await io_threads.run(walk.page, most, self._tree_budget)
            token = _encode_page_token(root, walk.position) if walk.more else ""
            yield re_pb2.GetTreeResponse(directories=page, next_page_token=token)
            if not walk.more:
                return


def _field_size(length: int) -> int:
    """Bytes a length-delimited field of `length` bytes takes in a message (tag < 16)."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


class TreeWalk:
    """Breadth-first over the distinct Directory messages under a root (each digest once, so a
    small tree of repeated subtrees cannot make an endless stream). Children come in the order
    their parent lists them, so the order is the same on every call while the CAS holds the
    same blobs, which is what makes a page token (a count of directories) resumable.

    Blocking (reads the disk): run it in a thread.
    """

    def __init__(self, store: DiskBlobStore, root: Digest) -> None:
        self._store = store
        self._root = root
        self._pending: deque[Digest] = deque()
        self._seen: set[Digest] = {root}
        self._next: re_pb2.Directory | None = None
        self.position = 0  # directories handed out so far

    @property
    def more(self) -> bool:
        return self._next is not None

    def skip(self, count: int) -> None:
        """Reads the root (NotFound if absent), then passes over `count` directories."""
        try:
            data = self._store.read(self._root)
        except NotFound:
            raise NotFound(f"root directory {self._root} is not in the CAS") from None
        self._next = self._parse(self._root, data)
        for _ in range(count):
            if self._next is None:
                raise InvalidArgument("page_token points past the end of this tree")
            self._advance()

    def page(self, most: int, budget: int) -> list[re_pb2.Directory]:
        """Up to `most` directories whose fields in a GetTreeResponse add up to at most
        `budget` bytes; a single directory above the budget still goes, alone."""
        page: list[re_pb2.Directory] = []
        used = 0
        while self._next is not None and len(page) < most:
            cost = _field_size(self._next.ByteSize())
            if page and used + cost > budget:
                break
            page.append(self._next)
            used += cost
            self._advance()
        return page

    def _advance(self) -> None:
        assert self._next is not None
        for child in self._next.directories:
            try:
                digest = Digest.from_proto(child.digest)
            except InvalidArgument:
                continue  # not a digest this server could hold: as good as missing
            if digest not in self._seen:
                self._seen.add(digest)
                self._pending.append(digest)
        self.position += 1
        self._next = None
        while self._pending and self._next is None:
            digest = self._pending.popleft()
            try:
                data = self._store.read(digest)
            except NotFound:
                continue  # The spec leaves missing subtrees out of the answer.
            self._next = self._parse(digest, data)

    @staticmethod
    def _parse(digest: Digest, data: bytes) -> re_pb2.Directory:
        try:
            return re_pb2.Directory.FromString(data)
        except DecodeError:
            raise InvalidArgument(f"blob {digest} in the tree is not a Directory") from None


def _encode_page_token(root: Digest, position: int) -> str:
    return base64.urlsafe_b64encode(f"tree:{root}:{position}".encode()).decode()


def _decode_page_token(token: str, root: Digest) -> int:
    """The number of directories to skip; INVALID_ARGUMENT for a token this server did not
    issue for this root."""
    if not token:
        return 0
    try:
        kind, tree, position = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if kind == "tree" and tree == str(root) and position.isdigit():
            return int(position)
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument(f"page_token {token!r} was not issued by this server for root {root}")
