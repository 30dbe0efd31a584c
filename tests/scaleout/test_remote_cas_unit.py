"""RemoteCas against a counting CAS server on loopback (real gRPC, real disk CAS, no Docker):
negotiated batch sizes, one download per blob however many leases want it, missing blobs named,
uploads of only what the scheduler lacks."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.protobuf import any_pb2

from tests.scaleout.services import free_port
from worker.bots.leases import LeaseRunner
from worker.bots.remote_cas import RemoteCas
from worker.bots.rwapi import bots_pb2
from worker.cas.disk_store import DiskBlobStore
from worker.config import load_settings
from worker.digests import Digest
from worker.errors import Cancelled, FailedPrecondition
from worker.execution.executor import ActionExecutor
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2, status_pb2

BATCH = 64 * 1024


class CountingCas(
    re_grpc.ContentAddressableStorageServicer,
    re_grpc.CapabilitiesServicer,
    bs_grpc.ByteStreamServicer,
):
    # Pause before each 10,000-byte ByteStream chunk (SlowCas sets one).
    CHUNK_PAUSE_S = 0.0

    def __init__(self, blobs: dict[Digest, bytes]) -> None:
        self.blobs = blobs
        self.reads: Counter[Digest] = Counter()
        self.written: list[Digest] = []

    async def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: object
    ) -> re_pb2.ServerCapabilities:
        capabilities = re_pb2.ServerCapabilities()
        capabilities.cache_capabilities.max_batch_total_size_bytes = BATCH
        capabilities.cache_capabilities.digest_function.append(re_pb2.DigestFunction.SHA256)
        return capabilities

    async def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: object
    ) -> re_pb2.BatchReadBlobsResponse:
        await asyncio.sleep(0.2)  # long enough for a second fetch to arrive meanwhile
        response = re_pb2.BatchReadBlobsResponse()
        assert sum(d.size_bytes for d in request.digests) <= BATCH
        for proto in request.digests:
            digest = Digest.from_proto(proto)
            self.reads[digest] += 1
            if digest in self.blobs:
                response.responses.add(digest=proto, data=self.blobs[digest])
            else:
                response.responses.add(digest=proto, status=status_pb2.Status(code=5))
        return response

    async def Read(
        self, request: bs_pb2.ReadRequest, context: object
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        hash_, size = request.resource_name.split("/")[-2:]
        digest = Digest(hash_, int(size))
        self.reads[digest] += 1
        data = self.blobs[digest]
        for start in range(0, len(data), 10_000):
            if self.CHUNK_PAUSE_S:
                await asyncio.sleep(self.CHUNK_PAUSE_S)
            yield bs_pb2.ReadResponse(data=data[start : start + 10_000])

    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: object
    ) -> re_pb2.FindMissingBlobsResponse:
        missing = [d for d in request.blob_digests if Digest.from_proto(d) not in self.blobs]
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=missing)

    async def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: object
    ) -> re_pb2.BatchUpdateBlobsResponse:
        response = re_pb2.BatchUpdateBlobsResponse()
        for item in request.requests:
            digest = Digest.from_proto(item.digest)
            assert Digest.of(item.data) == digest
            self.blobs[digest] = item.data
            self.written.append(digest)
            response.responses.add(digest=item.digest)
        return response


async def _with_cas(
    blobs: dict[Digest, bytes], tmp_path: Path, kind: type[CountingCas] = CountingCas
) -> tuple[grpc.aio.Server, grpc.aio.Channel, CountingCas, RemoteCas, DiskBlobStore]:
    servicer = kind(blobs)
    server = grpc.aio.server()
    re_grpc.add_ContentAddressableStorageServicer_to_server(servicer, server)
    re_grpc.add_CapabilitiesServicer_to_server(servicer, server)
    bs_grpc.add_ByteStreamServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    store = DiskBlobStore(tmp_path / "cas", 1 << 30)
    remote = RemoteCas(channel, "", store)
    await remote.negotiate()
    return server, channel, servicer, remote, store


def test_concurrent_fetches_of_the_same_blobs_download_each_once(tmp_path: Path) -> None:
    small = [f"blob {i}".encode() * 1000 for i in range(40)]  # ~7 KiB each: several batches
    large = bytes(range(256)) * 1024  # 256 KiB: over ByteStream
    blobs = {Digest.of(data): data for data in [*small, large]}

    async def scenario() -> CountingCas:
        server, channel, servicer, remote, store = await _with_cas(dict(blobs), tmp_path)
        try:
            assert remote.batch_bytes == BATCH
            await asyncio.gather(*(remote.fetch(list(blobs)) for _ in range(4)))
            for digest, data in blobs.items():
                assert store.read(digest) == data
            await remote.fetch(list(blobs))  # all local now: nothing asked
        finally:
            await channel.close(None)
            await server.stop(None)
        return servicer

    servicer = asyncio.run(scenario())
    assert set(servicer.reads) == set(blobs)
    assert set(servicer.reads.values()) == {1}


def test_missing_blobs_are_named_for_every_lease_that_wanted_them(tmp_path: Path) -> None:
    present = b"here"
    absent = [b"gone one", b"gone two"]

    async def scenario() -> list[BaseException | None]:
        server, channel, _, remote, _ = await _with_cas({Digest.of(present): present}, tmp_path)
        try:
            wanted = [Digest.of(present), *map(Digest.of, absent)]
            return list(
                await asyncio.gather(
                    remote.fetch(wanted), remote.fetch(wanted), return_exceptions=True
                )
            )
        finally:
            await channel.close(None)
            await server.stop(None)

    for outcome in asyncio.run(scenario()):
        assert isinstance(outcome, FailedPrecondition)
        assert sorted(outcome.missing) == sorted(Digest.of(d).subject() for d in absent)


def test_uploads_send_only_what_the_scheduler_lacks(tmp_path: Path) -> None:
    known = b"already there"

    async def scenario() -> CountingCas:
        server, channel, servicer, remote, store = await _with_cas(
            {Digest.of(known): known}, tmp_path
        )
        try:
            for data in (known, b"new output"):
                store.put(Digest.of(data), data)
            await remote.upload([Digest.of(known), Digest.of(b"new output")])
        finally:
            await channel.close(None)
            await server.stop(None)
        return servicer

    assert asyncio.run(scenario()).written == [Digest.of(b"new output")]


def test_a_scheduler_without_sha256_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = grpc.aio.server()

        class Md5Only(re_grpc.CapabilitiesServicer):
            async def GetCapabilities(
                self, request: re_pb2.GetCapabilitiesRequest, context: object
            ) -> re_pb2.ServerCapabilities:
                capabilities = re_pb2.ServerCapabilities()
                capabilities.cache_capabilities.digest_function.append(re_pb2.DigestFunction.MD5)
                return capabilities

        re_grpc.add_CapabilitiesServicer_to_server(Md5Only(), server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            with pytest.raises(ValueError, match="SHA-256"):
                await RemoteCas(channel, "", DiskBlobStore(tmp_path / "cas", 1 << 30)).negotiate()
        finally:
            await channel.close(None)
            await server.stop(None)

    asyncio.run(scenario())


class SlowCas(CountingCas):
    """Streams large blobs at about 200 KB/s: a 2 MB input takes ten seconds to arrive."""

    CHUNK_PAUSE_S = 0.05


def test_a_lease_cancelled_while_its_inputs_download_stops_the_download(tmp_path: Path) -> None:
    """The scheduler takes a lease back (an ACTIVE lease missing from its reply) while a large
    input is still on its way: the download stops at once, leaving no partial file, and the
    lease ends Cancelled without running."""
    large = os.urandom(2_000_000)
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="big.bin", digest=Digest.of(large).to_proto())]
    )
    command = re_pb2.Command(arguments=["true"])
    blobs = {
        Digest.of(data): data
        for data in (large, root.SerializeToString(), command.SerializeToString())
    }
    action = re_pb2.Action(
        command_digest=Digest.of(command.SerializeToString()).to_proto(),
        input_root_digest=Digest.of(root.SerializeToString()).to_proto(),
    )
    payload = any_pb2.Any()
    payload.Pack(action)

    async def scenario() -> tuple[float, DiskBlobStore]:
        server, channel, servicer, remote, store = await _with_cas(
            blobs,
            tmp_path,
            SlowCas,  # type: ignore[type-abstract]  # unused methods stay abstract
        )
        try:
            runner = LeaseRunner(
                store,
                remote,
                cast(ActionExecutor, None),  # never reached: the lease ends before it runs
                load_settings().execution,
                "bot",
            )
            cancelled = asyncio.Event()
            lease = asyncio.ensure_future(
                runner.run(
                    bots_pb2.Lease(id="l", payload=payload),
                    re_pb2.ExecutedActionMetadata(),
                    cancelled,
                )
            )
            for _ in range(100):
                if servicer.reads[Digest.of(large)]:
                    break
                await asyncio.sleep(0.05)
            assert servicer.reads[Digest.of(large)] == 1, "the large input never started"
            await asyncio.sleep(0.5)
            cancelled.set()
            started = time.monotonic()
            with pytest.raises(Cancelled):
                await asyncio.wait_for(lease, 5)
            return time.monotonic() - started, store
        finally:
            await channel.close(None)
            await server.stop(None)

    seconds, store = asyncio.run(scenario())
    assert seconds < 2, f"the download went on for {seconds:.1f} s after the cancel"
    assert not store.contains(Digest.of(large))
    assert list((tmp_path / "cas" / "tmp").iterdir()) == []
    store.close()
