"""Attacks on what the operator side added: the metrics a client can feed, the admin interface a
client or an action might reach. Real service over loopback; no Docker needed."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.execution_client import run, shell_action
from tests.security.conftest import attack_settings
from tests.serving import running_service
from worker.admin.server import AdminServer
from worker.admin.servicer import AdminServicer
from worker.cas.disk_store import DiskBlobStore
from worker.config import load_settings
from worker.digests import Digest
from worker.metrics import service_metrics
from worker.metrics.http import MAX_CONNECTIONS
from worker.metrics.service_metrics import OVERFLOW
from worker.pool import images

TOKEN = "attack-token-0123456789abcdef"


def _method_labels(registry: Any) -> set[str]:
    return {
        sample.labels["method"]
        for metric in registry.collect()
        if metric.name == "sidecar_executor_grpc_requests"
        for sample in metric.samples
    }


def test_made_up_method_names_add_no_metric_labels(tmp_path: Path) -> None:
    """With bearer tokens on, a call to a method that does not exist is refused
    UNAUTHENTICATED before the server looks it up, and counted: the method name the client
    made up must not become a label, or every new name costs memory for good."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    settings = load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0", "auth": {"token_file": str(tokens)}},
        execution={"enabled": False},
    )
    made_up = [f"/attack.S{secrets.token_hex(8)}/M{'x' * 2000}" for _ in range(50)]
    with running_service(settings) as running:
        for method in made_up:
            with pytest.raises(grpc.RpcError) as refused:
                running.channel.unary_unary(method, None, None)(b"", timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        authorised = (("authorization", f"Bearer {TOKEN}"),)
        with pytest.raises(grpc.RpcError) as unknown:
            running.channel.unary_unary(made_up[0], None, None)(
                b"", metadata=authorised, timeout=30
            )
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        labels = _method_labels(running.service.metrics.registry)
    assert not labels & set(made_up)
    # Refused calls still show, under one label for every method the server does not have.
    assert labels and all(label.startswith("/") or label == "unknown" for label in labels)
    assert "unknown" in labels


@pytest.mark.parametrize("address", ["0.0.0.0:9999", "[::]:9999", "admin.example:9999"])
def test_the_admin_interface_is_never_served_beyond_this_host(tmp_path: Path, address: str) -> None:
    """The admin interface authenticates nobody, so an address other hosts can reach is a
    configuration error (the REAPI port at least asks for tokens or client certificates)."""
    with pytest.raises(ValueError, match="admin.listen"):
        load_settings(data_dir=tmp_path, admin={"listen": address})
    assert load_settings(data_dir=tmp_path, admin={"listen": "127.0.0.1:9999"}).admin_address


def test_endless_made_up_images_cost_bounded_memory(
    tmp_path: Path, test_images: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every action naming an image nobody has makes the worker try a pull that fails. The
    image names a client makes up must not each add metric labels and remembered pull times
    for good (the bounds are lowered here so that a few dozen actions cross them)."""
    monkeypatch.setattr(service_metrics, "MAX_LABEL_SETS", 10)
    monkeypatch.setattr(images, "MAX_REMEMBERED", 10)
    settings = attack_settings(tmp_path)
    made_up = [f"sidecar-test/made-up-{secrets.token_hex(6)}" for _ in range(30)]
    with running_service(settings) as running:
        for image in made_up:
            response = run(running.channel, shell_action("true", image))
            assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert image in response.status.message
        pulled = {
            sample.labels["image"]
            for metric in running.service.metrics.registry.collect()
            if metric.name == "sidecar_executor_image_pulls"
            for sample in metric.samples
        }
        execution = running.service.execution
        assert execution is not None
        remembered = execution.pools.images._pulled_at
    assert len(pulled - {OVERFLOW}) <= 10 and OVERFLOW in pulled
    assert len(remembered) <= 10


def test_binding_the_admin_socket_changes_no_other_files_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The REAPI port serves before the admin socket is bound, so CAS threads may be writing
    blobs at that very moment. Whatever makes the socket root-only must not reach them: a
    blob written then must still be readable by an action's user (0444), not 0400."""
    store = DiskBlobStore(tmp_path / "cas", 1 << 30)
    blob = b"written by a CAS thread while the admin socket is bound" * 2000  # not journalled
    bind = AdminServer._bind

    def bind_while_a_blob_is_written(self: AdminServer, address: str) -> int:
        port = bind(self, address)
        writer = threading.Thread(target=store.put, args=(Digest.of(blob), blob))
        writer.start()
        writer.join()
        return port

    monkeypatch.setattr(AdminServer, "_bind", bind_while_a_blob_is_written)
    socket = tmp_path / "admin.sock"

    async def start_and_stop() -> None:
        admin = AdminServer(f"unix:{socket}", AdminServicer(None, None))
        await admin.start()
        try:
            assert socket.is_socket() and socket.stat().st_mode & 0o777 == 0o600
            assert sorted(os.listdir(tmp_path)) == ["admin.sock", "cas"]
        finally:
            await admin.stop()

    asyncio.run(start_and_stop())
    assert os.stat(store.hash_path(Digest.of(blob).hash)).st_mode & 0o777 == 0o444


def test_idle_connections_to_the_metrics_port_hold_bounded_threads(tmp_path: Path) -> None:
    """Whoever reaches metrics.listen may open connections and send nothing: each must not
    keep a thread of the worker for good (threads are memory, and the process's limit)."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0"},
        metrics={"listen": "127.0.0.1:0"},
        execution={"enabled": False},
    )
    with running_service(settings) as running:
        endpoint = running.service.metrics_endpoint
        assert endpoint is not None
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(40)]
        try:
            time.sleep(1)
            assert threading.active_count() - before <= MAX_CONNECTIONS
        finally:
            for connection in idle:
                connection.close()
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=30)
        assert b"sidecar_executor_cas_bytes" in scraped.read()


def test_the_admin_socket_never_replaces_a_file_at_its_path(tmp_path: Path) -> None:
    """admin.listen naming a file that is not a socket (a typo, a path another program uses)
    stops the start; the file is left as it was."""
    target = tmp_path / "precious"
    target.write_text("keep me\n")

    async def start() -> None:
        admin = AdminServer(f"unix:{target}", AdminServicer(None, None))
        try:
            with pytest.raises(FileExistsError):
                await admin.start()
        finally:
            await admin.stop()

    asyncio.run(start())
    assert target.read_text() == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["precious"]  # no private directory left behind
