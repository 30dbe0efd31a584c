"""Attacks on worker mode through what the scheduler sends: its Actions and blobs come from any
client of the scheduler, and the scheduler itself may be wrong. A hostile scheduler CAS on
loopback (real gRPC) against the bot's real RemoteCas and disk CAS; no Docker needed."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from tests.scaleout.services import free_port
from tests.security.test_deep_trees import oversized_directory
from worker.bots.remote_cas import RemoteCas
from worker.cas.disk_store import DiskBlobStore
from worker.digests import Digest
from worker.errors import InvalidArgument, ResourceExhausted, Unavailable
from worker.reapi import bs_grpc, bs_pb2, re_grpc, re_pb2

MiB = 1 << 20
T = TypeVar("T")


class HostileCas(re_grpc.ContentAddressableStorageServicer, bs_grpc.ByteStreamServicer):
    """Serves `blobs` (by digest, whatever the bytes), `extra` bytes more on every stream."""

    def __init__(self, blobs: dict[Digest, bytes], extra: int = 0) -> None:
        self.blobs = blobs
        self.extra = extra
        self.reads: Counter[Digest] = Counter()
        self.bytes_sent = 0

    async def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: object
    ) -> re_pb2.BatchReadBlobsResponse:
        response = re_pb2.BatchReadBlobsResponse()
        for proto in request.digests:
            digest = Digest.from_proto(proto)
            self.reads[digest] += 1
            response.responses.add(digest=proto, data=self.blobs[digest])
        return response

    async def Read(
        self, request: bs_pb2.ReadRequest, context: object
    ) -> AsyncIterator[bs_pb2.ReadResponse]:
        hash_, size = request.resource_name.split("/")[-2:]
        digest = Digest(hash_, int(size))
        self.reads[digest] += 1
        data = self.blobs[digest] + b"x" * self.extra
        for start in range(0, len(data), 64 * 1024):
            chunk = data[start : start + 64 * 1024]
            self.bytes_sent += len(chunk)
            yield bs_pb2.ReadResponse(data=chunk)


def hostile_cas(blobs: dict[Digest, bytes], extra: int = 0) -> HostileCas:
    return HostileCas(blobs, extra)  # type: ignore[abstract]  # unused methods stay abstract


def against(
    tmp_path: Path,
    cas: HostileCas,
    attack: Callable[[RemoteCas, DiskBlobStore], Awaitable[T]],
    max_bytes: int = 1 << 30,
) -> T:
    """Runs `attack` with a bot's RemoteCas (local CAS of `max_bytes`) talking to `cas`."""

    async def scenario() -> T:
        server = grpc.aio.server()
        re_grpc.add_ContentAddressableStorageServicer_to_server(cas, server)
        bs_grpc.add_ByteStreamServicer_to_server(cas, server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            remote = RemoteCas(channel, "", DiskBlobStore(tmp_path / "cas", max_bytes))
            remote.batch_bytes = 64 * 1024
            return await attack(remote, remote._store)
        finally:
            await channel.close(None)
            await server.stop(None)

    return asyncio.run(scenario())


def _temp_files(tmp_path: Path) -> list[str]:
    return os.listdir(tmp_path / "cas" / "tmp")


def test_a_blob_larger_than_the_local_cas_is_refused_before_it_is_downloaded(
    tmp_path: Path,
) -> None:
    """A client names an input bigger than the whole local CAS: the bot must not fill its disk
    with it first (a declared 1 TB would do), but refuse it at once."""
    data = os.urandom(3 * MiB)
    cas = hostile_cas({Digest.of(data): data})

    async def attack(remote: RemoteCas, store: DiskBlobStore) -> None:
        with pytest.raises(ResourceExhausted, match="larger than the whole CAS"):
            await remote.fetch([Digest.of(data)])

    against(tmp_path, cas, attack, max_bytes=MiB)
    assert cas.reads[Digest.of(data)] == 0 and cas.bytes_sent == 0
    assert _temp_files(tmp_path) == []


def test_a_scheduler_that_streams_more_than_the_digest_says_is_cut_off(tmp_path: Path) -> None:
    data = os.urandom(200 * 1024)
    cas = hostile_cas({Digest.of(data): data}, extra=64 * MiB)

    async def attack(remote: RemoteCas, store: DiskBlobStore) -> None:
        with pytest.raises(Unavailable, match="do not hash"):
            await remote.fetch([Digest.of(data)])
        assert not store.contains(Digest.of(data))

    against(tmp_path, cas, attack)
    assert cas.bytes_sent < 32 * MiB  # the stream was dropped, not read to its end
    assert _temp_files(tmp_path) == []


def _chain(depth: int, leaf: bytes) -> tuple[dict[Digest, bytes], Digest]:
    blobs = {Digest.of(leaf): leaf}
    directory = re_pb2.Directory()
    directory.files.add(name="leaf", digest=Digest.of(leaf).to_proto())
    for _ in range(depth):
        data = directory.SerializeToString()
        blobs[Digest.of(data)] = data
        directory = re_pb2.Directory()
        directory.directories.add(name="d", digest=Digest.of(data).to_proto())
    data = directory.SerializeToString()
    blobs[Digest.of(data)] = data
    return blobs, Digest.of(data)


def _action(blobs: dict[Digest, bytes], root: Digest) -> re_pb2.Action:
    command = re_pb2.Command(arguments=["true"]).SerializeToString()
    blobs[Digest.of(command)] = command
    return re_pb2.Action(
        command_digest=Digest.of(command).to_proto(), input_root_digest=root.to_proto()
    )


def test_input_trees_too_deep_or_too_wide_are_refused_before_their_files_are_fetched(
    tmp_path: Path,
) -> None:
    leaf = b"the file at the bottom"
    deep, deep_root = _chain(40, leaf)
    wide_dir = re_pb2.Directory()
    for i in range(101):
        wide_dir.files.add(name=f"f{i}", digest=Digest.of(leaf).to_proto())
    wide = {Digest.of(wide_dir.SerializeToString()): wide_dir.SerializeToString()}
    cas = hostile_cas({**deep, **wide})
    deep_action = _action(cas.blobs, deep_root)
    wide_action = _action(cas.blobs, Digest.of(wide_dir.SerializeToString()))

    async def attack(remote: RemoteCas, store: DiskBlobStore) -> None:
        with pytest.raises(InvalidArgument, match="deeper than 10"):
            await remote.fetch_action(deep_action, max_depth=10, max_entries=100)
        with pytest.raises(InvalidArgument, match="more than 100 entries"):
            await remote.fetch_action(wide_action, max_depth=10, max_entries=100)
        assert not store.contains(Digest.of(leaf))

    against(tmp_path, cas, attack)
    assert cas.reads[Digest.of(leaf)] == 0


def test_a_directory_blob_too_big_to_parse_safely_is_refused_before_it_is_fetched(
    tmp_path: Path,
) -> None:
    data, digest = oversized_directory()
    cas = hostile_cas({digest: data})
    action = _action(cas.blobs, digest)

    async def attack(remote: RemoteCas, store: DiskBlobStore) -> None:
        with pytest.raises(InvalidArgument, match="larger than"):
            await remote.fetch_action(action, max_depth=10, max_entries=100)

    against(tmp_path, cas, attack)
    assert cas.reads[digest] == 0
