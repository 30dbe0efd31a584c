"""The admin interface of a cache-only service (no Docker): its own root-only socket, clear
errors without execution, and a data directory too deep for a socket path."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.serving import running_service
from worker.app import Service
from worker.config import load_settings
from worker.reapi import admin_pb2, admin_pb2_grpc


def test_cache_only_service_answers_admin_calls_with_failed_precondition(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data", server={"listen": "127.0.0.1:0"}, execution={"enabled": False}
    )
    with running_service(settings) as running:
        socket = tmp_path / "data" / "admin.sock"
        assert socket.is_socket() and socket.stat().st_mode & 0o777 == 0o600
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            with pytest.raises(grpc.RpcError) as pools:
                stub.ListPools(admin_pb2.ListPoolsRequest(), timeout=10)
            assert pools.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "execution is disabled" in str(pools.value.details())
            with pytest.raises(grpc.RpcError) as operations:
                stub.ListOperations(admin_pb2.ListOperationsRequest(), timeout=10)
            assert operations.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert running.service.port > 0
    assert not socket.exists()  # removed at shutdown


def test_a_data_directory_too_deep_for_the_default_socket_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep = tmp_path / ("d" * 100) / "data"
    settings = load_settings(
        data_dir=deep, server={"listen": "127.0.0.1:0"}, execution={"enabled": False}
    )
    with caplog.at_level(logging.ERROR), running_service(settings) as running:
        assert running.service.port > 0
    assert "admin interface disabled" in caplog.text and "shorter unix:PATH" in caplog.text


def test_the_admin_address_may_not_be_the_reapi_address(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:18999"},
        admin={"listen": "127.0.0.1:18999"},
        execution={"enabled": False},
    )

    async def build() -> None:
        Service(settings)

    with pytest.raises(OSError, match="must not be the REAPI address"):
        asyncio.run(build())
    assert not (tmp_path / "data" / "admin.sock").exists()


@pytest.mark.parametrize(
    ("section", "value"),
    [("metrics", "9464"), ("metrics", "localhost:http"), ("admin", "unix:"), ("admin", "sock")],
)
def test_bad_listen_addresses_are_named_errors(tmp_path: Path, section: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{section}.listen"):
        overrides: dict[str, Any] = {section: {"listen": value}}
        load_settings(data_dir=tmp_path, **overrides)
