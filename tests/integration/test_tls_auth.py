"""TLS, client certificates and bearer tokens on the REAPI port (docs/AUTH.md), against the real
service over loopback with certificates made here."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests.certificates import Pki, issue, make_ca, make_pki
from tests.execution_client import run, shell_action, stdout_of
from tests.images import IMAGE_A
from tests.reapi_client import upload_batch, write_resource
from tests.serving import RunningService, running_service
from worker.config import Settings, load_settings
from worker.digests import Digest
from worker.reapi import bs_pb2, ops_pb2, re_grpc, re_pb2

TOKEN = "reapi-token-0123456789abcdef"
OTHER_TOKEN = "rotated-token-fedcba9876543210"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

# Every method of every service the port serves, health apart.
GUARDED_SERVICES: list[ServiceDescriptor] = [
    re_pb2.DESCRIPTOR.services_by_name[name]
    for name in ("Capabilities", "ContentAddressableStorage", "ActionCache", "Execution")
] + [
    ops_pb2.DESCRIPTOR.services_by_name["Operations"],
    bs_pb2.DESCRIPTOR.services_by_name["ByteStream"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
GUARDED_METHODS = [
    (f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming)
    for service in GUARDED_SERVICES
    for method in service.methods
] + [("/no.such.Service/Method", False, False)]


Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def call_raw(
    channel: grpc.Channel,
    method: str,
    client_streaming: bool,
    server_streaming: bool,
    metadata: Metadata | None,
) -> grpc.StatusCode:
    """Calls any method with an empty request message (raw bytes, no stubs) and returns the
    status it ends with."""
    try:
        if client_streaming and server_streaming:
            list(
                channel.stream_stream(method, None, None)(
                    iter([b""]), metadata=metadata, timeout=30
                )
            )
        elif client_streaming:
            channel.stream_unary(method, None, None)(iter([b""]), metadata=metadata, timeout=30)
        elif server_streaming:
            list(channel.unary_stream(method, None, None)(b"", metadata=metadata, timeout=30))
        else:
            channel.unary_unary(method, None, None)(b"", metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def health(channel: grpc.Channel) -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=30
    )
    return int(response.status)


def tls_channel(
    service: RunningService, trust: Path, client: Any = None, token: str | None = None
) -> grpc.Channel:
    """A TLS channel trusting `trust`, showing `client`'s certificate if given, sending `token`
    on every call if given (call credentials: how real clients do it)."""
    credentials = grpc.ssl_channel_credentials(
        trust.read_bytes(),
        client.key_file.read_bytes() if client else None,
        client.cert_file.read_bytes() if client else None,
    )
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return grpc.secure_channel(service.address, credentials)


def write_tokens(path: Path, *tokens: str) -> None:
    """Writes the token file the way Kubernetes updates a Secret volume: the new content in a
    new directory, `..data` swapped to it atomically, the file name a symlink through `..data`."""
    directory = path.parent
    fresh = directory / f"..{time.monotonic_ns()}"
    fresh.mkdir()
    (fresh / path.name).write_text("".join(f"{token}\n" for token in tokens))
    staging = directory / "..data_tmp"
    staging.symlink_to(fresh.name)
    os.replace(staging, directory / "..data")
    if not path.is_symlink():
        path.symlink_to(f"..data/{path.name}")


def settings_with(tmp_path: Path, execution: bool = False, **server: object) -> Settings:
    execution_settings: dict[str, object] = {"enabled": False}
    if execution:
        execution_settings = {
            "allowed_images": ["sidecar-test/*"],
            "default_timeout_s": 60,
            "pool": {"max_sidecars": 1},
        }
    return load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0", **server},
        execution=execution_settings,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret" / "tokens"
    path.parent.mkdir()
    write_tokens(path, TOKEN)
    return path


@pytest.fixture
def mtls_token_service(
    tmp_path: Path, pki: Pki, token_file: Path, test_images: None
) -> Iterator[RunningService]:
    """TLS, client certificates and tokens together, with execution (real Docker)."""
    tls = {
        "cert_file": str(pki.server.cert_file),
        "key_file": str(pki.server.key_file),
        "client_ca_file": str(pki.client_ca.cert_file),
    }
    settings = settings_with(
        tmp_path, execution=True, tls=tls, auth={"token_file": str(token_file)}
    )
    with running_service(settings) as service:
        yield service


# ------------------------------------------------------------------ bearer tokens


@pytest.mark.docker
def test_every_method_but_health_refuses_calls_without_a_valid_token(
    mtls_token_service: RunningService, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Capabilities, CAS, ActionCache, Execute and WaitExecution streams, Operations, ByteStream
    streams, reflection and unknown methods: UNAUTHENTICATED without a token and with a wrong
    one; with the token none of them is. Health needs no token. No token is ever logged."""
    caplog.set_level(logging.DEBUG)
    channel = tls_channel(mtls_token_service, pki.server_ca.cert_file, pki.client)
    for method, client_streaming, server_streaming in GUARDED_METHODS:
        for metadata in (None, bearer("not-the-token-at-all-0000"), (("authorization", TOKEN),)):
            code = call_raw(channel, method, client_streaming, server_streaming, metadata)
            assert code == UNAUTHENTICATED, (method, metadata)
        code = call_raw(channel, method, client_streaming, server_streaming, bearer(TOKEN))
        assert code != UNAUTHENTICATED, method
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert "refused" in caplog.text
    assert TOKEN not in caplog.text and "not-the-token-at-all" not in caplog.text
    channel.close()


@pytest.mark.docker
def test_refused_writes_store_nothing_and_a_token_runs_a_real_action(
    mtls_token_service: RunningService, pki: Pki
) -> None:
    anonymous = tls_channel(mtls_token_service, pki.server_ca.cert_file, pki.client)
    blob = b"written without a token"
    digest = Digest.of(blob)
    request = bs_pb2.WriteRequest(
        resource_name=write_resource(digest),
        data=blob,
        finish_write=True,
    )
    write = anonymous.stream_unary(
        "/google.bytestream.ByteStream/Write",
        request_serializer=bs_pb2.WriteRequest.SerializeToString,
        response_deserializer=bs_pb2.WriteResponse.FromString,
    )
    assert status_of(lambda: write(iter([request]), timeout=30)) == UNAUTHENTICATED
    result = re_pb2.ActionResult(exit_code=0)
    update = re_pb2.UpdateActionResultRequest(
        action_digest=Digest.of(b"an action").to_proto(), action_result=result
    )
    cache = re_grpc.ActionCacheStub(anonymous)
    assert status_of(lambda: cache.UpdateActionResult(update, timeout=30)) == UNAUTHENTICATED

    trusted = tls_channel(mtls_token_service, pki.server_ca.cert_file, pki.client, token=TOKEN)
    missing = re_grpc.ContentAddressableStorageStub(trusted).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[digest.to_proto()])
    )
    assert [d.hash for d in missing.missing_blob_digests] == [digest.hash]
    lookup = re_pb2.GetActionResultRequest(action_digest=update.action_digest)
    assert (
        status_of(lambda: re_grpc.ActionCacheStub(trusted).GetActionResult(lookup, timeout=30))
        == grpc.StatusCode.NOT_FOUND
    )

    response = run(trusted, shell_action("echo over mtls", IMAGE_A))
    assert response.status.code == 0
    assert stdout_of(trusted, response) == b"over mtls\n"
    anonymous.close()
    trusted.close()


def test_token_file_rotation_takes_effect_without_a_restart(
    tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain TCP on loopback with tokens: the file swapped as a Kubernetes Secret update does
    it; the old token stops working, the new one works, from the next call on."""
    caplog.set_level(logging.DEBUG)
    settings = settings_with(tmp_path, auth={"token_file": str(token_file)})
    with running_service(settings) as service:
        capabilities = grpc.insecure_channel(service.address).unary_unary(
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", None, None
        )

        def status_with(token: str) -> grpc.StatusCode:
            return status_of(lambda: capabilities(b"", metadata=bearer(token), timeout=30))

        assert status_with(TOKEN) == grpc.StatusCode.OK
        assert status_with(OTHER_TOKEN) == UNAUTHENTICATED
        write_tokens(token_file, OTHER_TOKEN)
        assert status_with(OTHER_TOKEN) == grpc.StatusCode.OK
        assert status_with(TOKEN) == UNAUTHENTICATED
        write_tokens(token_file, "# both, during a hand-over", TOKEN, OTHER_TOKEN)
        assert status_with(TOKEN) == status_with(OTHER_TOKEN) == grpc.StatusCode.OK
        write_tokens(token_file, "short")  # no valid token left: every token is refused
        assert status_with(TOKEN) == status_with(OTHER_TOKEN) == UNAUTHENTICATED
        write_tokens(token_file, TOKEN)
        assert status_with(TOKEN) == grpc.StatusCode.OK
    assert TOKEN not in caplog.text and OTHER_TOKEN not in caplog.text
    assert "re-read" in caplog.text


def test_malformed_authorization_headers_are_unauthenticated(
    tmp_path: Path, token_file: Path
) -> None:
    settings = settings_with(tmp_path, auth={"token_file": str(token_file)})
    with running_service(settings) as service:
        capabilities = service.channel.unary_unary(
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", None, None
        )

        def status_with(metadata: Metadata) -> grpc.StatusCode:
            return status_of(lambda: capabilities(b"", metadata=metadata, timeout=30))

        for metadata in (
            (("authorization", f"Basic {TOKEN}"),),
            (("authorization", "Bearer"),),
            (("authorization", f"Bearer {TOKEN} extra"),),
            bearer(TOKEN[:-1]),
            bearer(f"{TOKEN}x"),
            bearer(TOKEN) + bearer(TOKEN),  # two credentials: which one counts is unclear
            (("x-authorization", f"Bearer {TOKEN}"),),
        ):
            assert status_with(metadata) == UNAUTHENTICATED, metadata
        assert status_with((("authorization", f"bearer {TOKEN}"),)) == grpc.StatusCode.OK


# -------------------------------------------------------------- TLS and client certs


def call_capabilities(channel: grpc.Channel) -> grpc.StatusCode:
    stub = re_grpc.CapabilitiesStub(channel)
    return status_of(lambda: stub.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=30))


def batch_read(channel: grpc.Channel, data: bytes) -> grpc.StatusCode:
    read = re_grpc.ContentAddressableStorageStub(channel).BatchReadBlobs
    request = re_pb2.BatchReadBlobsRequest(digests=[Digest.of(data).to_proto()])
    return status_of(lambda: read(request, timeout=30))


def test_client_certificates_are_required_and_checked_at_the_handshake(
    tmp_path: Path, pki: Pki
) -> None:
    """With server.tls.client_ca_file a connection without a certificate the CA signed (none,
    self-signed, from another CA, expired, not yet valid) fails its TLS handshake: the client
    sees UNAVAILABLE and no servicer ever runs. A client that does not trust the server's CA,
    or speaks plain TCP, gets nowhere either."""
    strangers = tmp_path / "strangers"
    other_ca = make_ca(strangers, "other-ca")
    refused_clients = {
        "none": None,
        "self-signed": issue(strangers, "self-signed", None, server=False),
        "other CA": issue(strangers, "other", other_ca, server=False),
        "expired": issue(strangers, "expired", pki.client_ca, server=False, valid_days=(-30, -1)),
        "not yet valid": issue(strangers, "future", pki.client_ca, server=False, valid_days=(1, 9)),
    }
    tls = {
        "cert_file": str(pki.server.cert_file),
        "key_file": str(pki.server.key_file),
        "client_ca_file": str(pki.client_ca.cert_file),
    }
    settings = settings_with(tmp_path, tls=tls)
    with running_service(settings) as service:
        data = b"only for certified clients"
        with tls_channel(service, pki.server_ca.cert_file, pki.client) as good:
            assert call_capabilities(good) == grpc.StatusCode.OK
            upload_batch(good, data)
            assert health(good) == health_pb2.HealthCheckResponse.SERVING
        for name, client in refused_clients.items():
            with tls_channel(service, pki.server_ca.cert_file, client) as channel:
                assert call_capabilities(channel) == grpc.StatusCode.UNAVAILABLE, name
                assert batch_read(channel, data) == grpc.StatusCode.UNAVAILABLE, name
        with tls_channel(service, other_ca.cert_file, pki.client) as distrusting:
            assert call_capabilities(distrusting) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(service.address) as plain:
            assert call_capabilities(plain) == grpc.StatusCode.UNAVAILABLE


def test_a_plain_text_health_port_answers_probes_when_the_reapi_port_has_tls(
    tmp_path: Path, pki: Pki
) -> None:
    """Kubernetes' gRPC probe speaks plain TCP and sends no certificate: with TLS and client
    certificates on the REAPI port it needs server.health_listen, which serves the same
    health statuses and nothing else."""
    tls = {
        "cert_file": str(pki.server.cert_file),
        "key_file": str(pki.server.key_file),
        "client_ca_file": str(pki.client_ca.cert_file),
    }
    settings = settings_with(tmp_path, tls=tls, health_listen="127.0.0.1:0")
    with running_service(settings) as service:
        health_port = service.service.health_port
        assert health_port not in (0, service.service.port)
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as probe:
            assert health(probe) == health_pb2.HealthCheckResponse.SERVING
            stub = health_pb2_grpc.HealthStub(probe)
            liveness = stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=30)
            assert liveness.status == health_pb2.HealthCheckResponse.SERVING
            for method, client_streaming, server_streaming in GUARDED_METHODS:
                code = call_raw(probe, method, client_streaming, server_streaming, None)
                assert code == grpc.StatusCode.UNIMPLEMENTED, method
            # The statuses are the service's own: a drain shows on the probe's port at once.
            service.call(service.service._health.enter_graceful_shutdown())
            assert health(probe) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(service.address) as plain:
            assert call_capabilities(plain) == grpc.StatusCode.UNAVAILABLE


def test_renewed_server_certificate_is_served_without_a_restart(tmp_path: Path, pki: Pki) -> None:
    """cert-manager (or a rotated Secret) replaces the certificate files: the next TLS
    handshake uses the new ones."""
    live = tmp_path / "live"
    live.mkdir()
    cert_file, key_file = live / "tls.crt", live / "tls.key"
    cert_file.write_bytes(pki.server.cert_file.read_bytes())
    key_file.write_bytes(pki.server.key_file.read_bytes())
    settings = settings_with(
        tmp_path,
        tls={"cert_file": str(cert_file), "key_file": str(key_file)},
        allow_insecure=False,
    )
    with running_service(settings) as service:
        with tls_channel(service, pki.server_ca.cert_file) as old:
            assert call_capabilities(old) == grpc.StatusCode.OK
        new_ca = make_ca(tmp_path / "new", "new-ca")
        renewed = issue(tmp_path / "new", "server", new_ca, server=True)
        for source, target in ((renewed.cert_file, cert_file), (renewed.key_file, key_file)):
            staged = target.with_suffix(".new")
            staged.write_bytes(source.read_bytes())
            os.replace(staged, target)
        with tls_channel(service, new_ca.cert_file) as new:
            assert call_capabilities(new) == grpc.StatusCode.OK
        with tls_channel(service, pki.server_ca.cert_file) as stale:
            assert call_capabilities(stale) == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------- start-up


def serve(config: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`sidecar-executor serve` with a configuration that must stop it before it serves."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "d"), **config}))
    return subprocess.run(
        [sys.executable, "-m", "worker", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "server",
    [
        {"listen": "0.0.0.0:8980"},
        {"listen": "[::]:8980"},
        {"listen": "10.1.2.3:8980"},
        {"listen": "worker.example:8980"},
        # TLS alone encrypts but authenticates nobody
        {"listen": "0.0.0.0:8980", "tls": {"cert_file": "/c", "key_file": "/k"}},
    ],
)
def test_an_exposed_port_without_client_authentication_is_refused(
    tmp_path: Path, server: dict[str, object]
) -> None:
    result = serve({"server": server, "execution": {"enabled": False}}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "server.allow_insecure" in result.stderr and "server.auth.token_file" in result.stderr
    assert "Traceback" not in result.stderr


def test_which_listen_addresses_need_authentication() -> None:
    for listen in ("127.0.0.1:8980", "127.0.0.2:1", "[::1]:8980", "localhost:8980"):
        assert load_settings(server={"listen": listen}).server.listen == listen
    for server in (
        {"listen": "0.0.0.0:8980", "allow_insecure": True},
        {"listen": "0.0.0.0:8980", "auth": {"token_file": "/t"}},
        {
            "listen": "0.0.0.0:8980",
            "tls": {"cert_file": "/c", "key_file": "/k", "client_ca_file": "/a"},
        },
    ):
        assert load_settings(server=server).server.listen == "0.0.0.0:8980"


@pytest.mark.parametrize(
    ("tls", "auth", "named", "code"),
    [
        ({}, {"token_file": "/nonexistent/tokens"}, "server.auth.token_file", 1),
        (
            {"cert_file": "/nonexistent/c", "key_file": "/nonexistent/k"},
            {},
            "server.tls.cert_file",
            1,
        ),
        ({"cert_file": "SERVER_CERT", "key_file": "CLIENT_KEY"}, {}, "server.tls.key_file", 1),
        (
            {"cert_file": "SERVER_CERT", "key_file": "SERVER_KEY", "client_ca_file": "TOKENS"},
            {},
            "server.tls.client_ca_file",
            1,
        ),
        ({}, {"token_file": "SHORT_TOKENS"}, "server.auth.token_file", 1),
        ({"key_file": "SERVER_KEY"}, {}, "server.tls.cert_file", 2),  # a setting without its pair
    ],
)
def test_unusable_credential_files_stop_the_service_naming_the_setting(
    tmp_path: Path, pki: Pki, tls: dict[str, str], auth: dict[str, str], named: str, code: int
) -> None:
    files = {
        "SERVER_CERT": pki.server.cert_file,
        "SERVER_KEY": pki.server.key_file,
        "CLIENT_KEY": pki.client.key_file,
        "TOKENS": tmp_path / "tokens",
        "SHORT_TOKENS": tmp_path / "short",
    }
    files["TOKENS"].write_text(f"{TOKEN}\n")
    files["SHORT_TOKENS"].write_text("# only a short one\nshort\n")
    server: dict[str, object] = {"listen": "127.0.0.1:0"}
    if tls:
        server["tls"] = {k: str(files.get(v, v)) for k, v in tls.items()}
    if auth:
        server["auth"] = {k: str(files.get(v, v)) for k, v in auth.items()}
    result = serve({"server": server, "execution": {"enabled": False}}, tmp_path)
    assert result.returncode == code, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert "serving REAPI" not in result.stderr
