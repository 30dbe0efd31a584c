"""The scheduler's CAS as seen from a bot: blobs come from it into the local disk CAS (which the
executor stages from with hard links, and which evicts the least recently used blobs above its
size bound) and outputs go back to it.

Limits are negotiated once (GetCapabilities): small blobs travel in batches no larger than the
scheduler's `max_batch_total_size_bytes`, bigger ones over ByteStream. A blob is fetched once:
concurrent leases that need the same blob wait for the one download already under way."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import grpc

from worker.bots.scheduler import MAX_MESSAGE_BYTES
from worker.cas.disk_store import DiskBlobStore, pwrite_all
from worker.digests import Digest
from worker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from worker.execution.inputs import check_parsed_size
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2

log = logging.getLogger(__name__)

# The scheduler's batch limit when it states none (0 means "no limit" in REAPI; we stay modest).
DEFAULT_BATCH_BYTES = 4 << 20
# What a blob costs in a batch besides its bytes (digest, status, framing).
PER_BLOB_OVERHEAD = 256
# ByteStream chunk size, well below any message limit.
CHUNK_BYTES = 1 << 20
# Digests per FindMissingBlobs request (about 100 bytes each on the wire).
FIND_MISSING_CHUNK = 10_000
# Requests to the scheduler's CAS in flight at once for one fetch or upload.
PARALLEL_REQUESTS = 4
# Deadline of one CAS request; a stalled scheduler makes the lease UNAVAILABLE, not stuck.
RPC_TIMEOUT_S = 300.0


def _unavailable(what: str, error: grpc.aio.AioRpcError) -> Unavailable:
    return Unavailable(
        f"the scheduler's CAS failed to {what}: {error.code().name}: {error.details()}"
    )


async def _all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Runs the coroutines together; the first failure ends the others and is raised as is."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None


class _Download:
    """One blob on its way in; waiters learn how it ended."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.error: ServiceError | None = None
        self.abandoned = False


class RemoteCas:
    def __init__(self, channel: grpc.aio.Channel, instance: str, store: DiskBlobStore) -> None:
        self._instance = instance
        self._store = store
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self._capabilities = re_grpc.CapabilitiesStub(channel)
        self.batch_bytes = DEFAULT_BATCH_BYTES
        self._downloads: dict[Digest, _Download] = {}

    # ------------------------------------------------------------ negotiation

    async def negotiate(self) -> None:
        """Reads the scheduler's CAS limits. Raises grpc.aio.AioRpcError if it cannot be asked,
        ValueError if it cannot serve this worker (no SHA-256)."""
        capabilities = await self._capabilities.GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name=self._instance), timeout=30
        )
        cache = capabilities.cache_capabilities
        functions = list(cache.digest_function)
        if functions and re_pb2.DigestFunction.SHA256 not in functions:
            raise ValueError("the scheduler's CAS does not offer SHA-256, the only digest we use")
        stated = cache.max_batch_total_size_bytes
        limit = stated if stated > 0 else DEFAULT_BATCH_BYTES
        self.batch_bytes = min(limit, MAX_MESSAGE_BYTES - (64 << 10))
        log.info("scheduler CAS: batches up to %d bytes, bigger blobs over ByteStream", limit)

    def _resource(self, digest: Digest, upload: bool = False) -> str:
        prefix = f"{self._instance}/" if self._instance else ""
        middle = f"uploads/{uuid.uuid4()}/" if upload else ""
        return f"{prefix}{middle}blobs/{digest.hash}/{digest.size}"

    def _fits_batch(self, digest: Digest) -> bool:
        return digest.size + PER_BLOB_OVERHEAD <= self.batch_bytes

    def _batches(self, digests: Iterable[Digest]) -> list[list[Digest]]:
        batches: list[list[Digest]] = []
        current: list[Digest] = []
        size = 0
        for digest in digests:
            cost = digest.size + PER_BLOB_OVERHEAD
            if current and size + cost > self.batch_bytes:
                batches.append(current)
                current, size = [], 0
            current.append(digest)
            size += cost
        if current:
            batches.append(current)
        return batches

    # ------------------------------------------------------------- fetching

    async def fetch(self, digests: Iterable[Digest]) -> None:
        """Makes the blobs present in the local CAS. FailedPrecondition (naming every missing
        blob, as REAPI's PreconditionFailure) if the scheduler lacks some, Unavailable if it
        cannot be reached."""
        wanted = list(dict.fromkeys(d for d in digests if not d.is_empty))
        missing: list[str] = []
        while wanted:
            absent = await anyio.to_thread.run_sync(self._store.find_missing, wanted)
            mine: list[Digest] = []
            theirs: list[tuple[Digest, _Download]] = []
            for digest in absent:
                running = self._downloads.get(digest)
                if running is not None:
                    theirs.append((digest, running))
                else:
                    self._downloads[digest] = _Download()
                    mine.append(digest)
            missing += await self._download_own(mine)
            wanted = []
            for digest, download in theirs:
                await download.ended.wait()
                if download.abandoned:  # its lease was cancelled: try again ourselves
                    wanted.append(digest)
                elif isinstance(download.error, FailedPrecondition):
                    missing += download.error.missing
                elif download.error is not None:
                    raise download.error
        if missing:
            raise FailedPrecondition(
                f"{len(missing)} input blob(s) are not in the scheduler's CAS",
                missing=sorted(set(missing)),
            )

    async def _download_own(self, digests: list[Digest]) -> list[str]:
        """Downloads the blobs this call registered; returns the subjects of those missing."""
        outcome: dict[Digest, ServiceError | None] = {}
        try:
            await self._download(digests, outcome)
        except ServiceError as error:
            for digest in digests:
                outcome.setdefault(digest, error)
            raise
        finally:
            for digest in digests:
                download = self._downloads.pop(digest)
                if digest in outcome:
                    download.error = outcome[digest]
                else:
                    download.abandoned = True
                download.ended.set()
        return [e.missing[0] for e in outcome.values() if isinstance(e, FailedPrecondition)]

    async def _download(
        self, digests: list[Digest], outcome: dict[Digest, ServiceError | None]
    ) -> None:
        for digest in digests:
            # Before a byte comes: a declared size is the client's word, and downloading it
            # first would fill the disk past storage.max_bytes.
            self._store.check_fits(digest)
        small = [d for d in digests if self._fits_batch(d)]
        large = [d for d in digests if not self._fits_batch(d)]
        limiter = asyncio.Semaphore(PARALLEL_REQUESTS)

        async def batch(part: list[Digest]) -> None:
            async with limiter:
                await self._read_batch(part, outcome)

        async def stream(digest: Digest) -> None:
            async with limiter:
                await self._read_stream(digest, outcome)

        await _all([*(batch(part) for part in self._batches(small)), *map(stream, large)])

    async def _read_batch(
        self, digests: list[Digest], outcome: dict[Digest, ServiceError | None]
    ) -> None:
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self._instance, digests=[d.to_proto() for d in digests]
        )
        try:
            response = await self._cas.BatchReadBlobs(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise _unavailable("send blobs", error) from None
        received: list[tuple[Digest, bytes]] = []
        for item in response.responses:
            try:
                digest = Digest.from_proto(item.digest)
            except InvalidArgument:
                continue
            if digest not in digests:
                continue
            if item.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                outcome[digest] = FailedPrecondition("missing", missing=[digest.subject()])
            elif item.status.code != 0:
                raise Unavailable(
                    f"the scheduler's CAS failed to send blob {digest}: {item.status.message}"
                )
            else:
                received.append((digest, item.data))
        await anyio.to_thread.run_sync(self._put_all, received)
        for digest, _ in received:
            outcome[digest] = None
        for digest in digests:
            if digest not in outcome:
                raise Unavailable(f"the scheduler's CAS left blob {digest} out of its answer")

    def _put_all(self, blobs: list[tuple[Digest, bytes]]) -> None:
        for digest, data in blobs:
            try:
                self._store.put(digest, data)
            except InvalidArgument:
                raise Unavailable(
                    f"the scheduler's CAS sent bytes that do not hash to {digest}"
                ) from None

    async def _read_stream(
        self, digest: Digest, outcome: dict[Digest, ServiceError | None]
    ) -> None:
        hasher = hashlib.sha256()
        size = 0
        temp = self._store.new_temp_path("fetch-")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                call = self._bytestream.Read(
                    bs_pb2.ReadRequest(resource_name=self._resource(digest)),
                    timeout=RPC_TIMEOUT_S,
                )
                async for chunk in call:
                    size += len(chunk.data)
                    if size > digest.size:
                        break
                    hasher.update(chunk.data)
                    await anyio.to_thread.run_sync(
                        pwrite_all, fd, chunk.data, size - len(chunk.data)
                    )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    outcome[digest] = FailedPrecondition("missing", missing=[digest.subject()])
                    return
                raise _unavailable(f"send blob {digest}", error) from None
            if size != digest.size or hasher.hexdigest() != digest.hash:
                raise Unavailable(f"the scheduler's CAS sent bytes that do not hash to {digest}")
            await anyio.to_thread.run_sync(self._store.commit, Path(temp), digest)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        outcome[digest] = None

    async def fetch_action(self, action: re_pb2.Action, max_depth: int, max_entries: int) -> None:
        """Brings the Command and the whole input tree (directories level by level, then every
        file) into the local CAS. InvalidArgument for a tree deeper or bigger than the
        executor accepts, so a hostile tree cannot make the worker download without end."""
        root = Digest.from_proto(action.input_root_digest)
        command = Digest.from_proto(action.command_digest)
        check_parsed_size(command, "Command")
        check_parsed_size(root)
        await self.fetch([command, root])
        files: set[Digest] = set()
        seen = {root}
        level = [root]
        depth = entries = 0
        while level:
            depth += 1
            if depth > max_depth:
                raise InvalidArgument(f"the input tree is deeper than {max_depth} levels")
            directories = await anyio.to_thread.run_sync(self._directories, level)
            following: list[Digest] = []
            for directory in directories:
                entries += (
                    len(directory.files) + len(directory.directories) + len(directory.symlinks)
                )
                files.update(Digest.from_proto(f.digest) for f in directory.files)
                for child in directory.directories:
                    digest = Digest.from_proto(child.digest)
                    if digest not in seen:
                        seen.add(digest)
                        following.append(digest)
            if entries > max_entries:
                raise InvalidArgument(f"the input tree has more than {max_entries} entries")
            for digest in following:
                check_parsed_size(digest)
            await self.fetch(following)
            level = following
        await self.fetch(files)

    def _directories(self, digests: Sequence[Digest]) -> list[re_pb2.Directory]:
        directories = []
        for digest in digests:
            try:
                data = self._store.read(digest)
            except NotFound:
                raise Unavailable(
                    f"directory {digest} left the local CAS at once; storage.max_bytes is too "
                    "small for this action"
                ) from None
            try:
                directories.append(re_pb2.Directory.FromString(data))
            except Exception as error:
                raise InvalidArgument(f"blob {digest} is not a Directory message") from error
        return directories

    # -------------------------------------------------------------- uploads

    async def upload_result(self, result: re_pb2.ActionResult) -> None:
        """Puts every blob the result refers to (outputs, the files of output Trees, the Trees,
        stdout and stderr) into the scheduler's CAS; Unavailable if that fails."""
        try:
            digests = await anyio.to_thread.run_sync(self._result_blobs, result)
            await self.upload(digests)
        except NotFound as error:  # evicted from the local CAS before it could be sent
            raise Unavailable(
                f"an output left the local CAS before its upload ({error}); storage.max_bytes "
                "is too small for this action's outputs"
            ) from None

    def _result_blobs(self, result: re_pb2.ActionResult) -> list[Digest]:
        digests = [Digest.from_proto(f.digest) for f in result.output_files]
        streams = (result.stdout_digest, result.stderr_digest)
        digests.extend(Digest.from_proto(stream) for stream in streams if stream.hash)
        for directory in result.output_directories:
            tree_digest = Digest.from_proto(directory.tree_digest)
            digests.append(tree_digest)
            tree = re_pb2.Tree.FromString(self._store.read(tree_digest))
            for node in (tree.root, *tree.children):
                digests.extend(Digest.from_proto(f.digest) for f in node.files)
        return list(dict.fromkeys(d for d in digests if not d.is_empty))

    async def upload(self, digests: list[Digest]) -> None:
        missing: list[Digest] = []
        for start in range(0, len(digests), FIND_MISSING_CHUNK):
            part = digests[start : start + FIND_MISSING_CHUNK]
            try:
                response = await self._cas.FindMissingBlobs(
                    re_pb2.FindMissingBlobsRequest(
                        instance_name=self._instance, blob_digests=[d.to_proto() for d in part]
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as error:
                raise _unavailable("say which outputs it lacks", error) from None
            missing += [Digest.from_proto(d) for d in response.missing_blob_digests]
        limiter = asyncio.Semaphore(PARALLEL_REQUESTS)

        async def batch(part: list[Digest]) -> None:
            async with limiter:
                await self._write_batch(part)

        async def stream(digest: Digest) -> None:
            async with limiter:
                await self._write_stream(digest)

        small = [d for d in missing if self._fits_batch(d)]
        large = [d for d in missing if not self._fits_batch(d)]
        await _all([*(batch(part) for part in self._batches(small)), *map(stream, large)])

    async def _write_batch(self, digests: list[Digest]) -> None:
        blobs = await anyio.to_thread.run_sync(lambda: [self._store.read(d) for d in digests])
        request = re_pb2.BatchUpdateBlobsRequest(instance_name=self._instance)
        for digest, data in zip(digests, blobs, strict=True):
            request.requests.add(digest=digest.to_proto(), data=data)
        try:
            response = await self._cas.BatchUpdateBlobs(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise _unavailable("store outputs", error) from None
        for item in response.responses:
            if item.status.code != 0:
                raise Unavailable(
                    f"the scheduler's CAS refused output {item.digest.hash}/"
                    f"{item.digest.size_bytes}: {item.status.message}"
                )

    async def _write_stream(self, digest: Digest) -> None:
        resource = self._resource(digest, upload=True)

        async def requests() -> AsyncIterator[bs_pb2.WriteRequest]:
            if digest.is_empty:
                yield bs_pb2.WriteRequest(resource_name=resource, finish_write=True)
                return
            fd, _ = await anyio.to_thread.run_sync(self._store.open_fd, digest)
            with os.fdopen(fd, "rb", buffering=0) as blob:
                offset = 0
                while True:
                    data = await anyio.to_thread.run_sync(blob.read, CHUNK_BYTES)
                    last = offset + len(data) >= digest.size or not data
                    yield bs_pb2.WriteRequest(
                        resource_name=resource if offset == 0 else "",
                        write_offset=offset,
                        data=data,
                        finish_write=last,
                    )
                    offset += len(data)
                    if last:
                        return

        try:
            response = await self._bytestream.Write(requests(), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise _unavailable(f"store output {digest}", error) from None
        if response.committed_size not in (digest.size, -1):
            raise Unavailable(
                f"the scheduler's CAS kept {response.committed_size} of {digest.size} bytes of "
                f"output {digest}"
            )
