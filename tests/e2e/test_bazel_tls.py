"""End to end: real Bazel 4.2.3 over TLS with a client certificate and a bearer token, and the
same Bazel turned away without them (docs/AUTH.md)."""

from __future__ import annotations

import glob
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certificates import Pki, issue, make_pki
from tests.e2e.bazel import BAZEL, Bazel, BazelRun, make_workspace
from tests.images import IMAGE_A
from tests.serving import RunningService, running_service
from worker.config import load_settings

# Debian builds Bazel against its own netty, whose JDK provider has no ALPN, so grpcs:// needs
# the OpenSSL provider: the native library of netty-tcnative, which netty looks up under the name
# libnetty_tcnative.so (and rejects when its real file name differs, so a copy, not a symlink).
TCNATIVE = next(iter(glob.glob("/usr/lib/*/jni/libnetty-tcnative.so")), None)

pytestmark = [
    pytest.mark.bazel,
    pytest.mark.docker,
    pytest.mark.skipif(
        BAZEL is None or TCNATIVE is None,
        reason="needs Debian's bazel-bootstrap and libnetty-tcnative-jni (make test installs them)",
    ),
]

TOKEN = "bazel-e2e-token-5f3a9c1d7e"

BUILD = """
genrule(
    name = "hello",
    srcs = ["input.txt"],
    outs = ["hello.txt"],
    cmd = "cat /etc/image-name $(SRCS) > $@",
)
"""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def secured_service(tmp_path: Path, pki: Pki, test_images: None) -> Iterator[RunningService]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    settings = load_settings(
        data_dir=tmp_path / "data",
        server={
            "listen": "127.0.0.1:0",
            "tls": {
                "cert_file": str(pki.server.cert_file),
                "key_file": str(pki.server.key_file),
                "client_ca_file": str(pki.client_ca.cert_file),
            },
            "auth": {"token_file": str(tokens)},
        },
        execution={
            "allowed_images": ["sidecar-test/*"],
            "default_timeout_s": 60,
            "pool": {"max_sidecars": 1},
        },
    )
    with running_service(settings) as service:
        yield service


def tls_startup_options(tmp_path: Path) -> list[str]:
    """Points Bazel's JVM at netty-tcnative, keeping its own library directory first."""
    assert TCNATIVE is not None
    jni = tmp_path / "jni"
    if not jni.is_dir():
        jni.mkdir()
        shutil.copyfile(TCNATIVE, jni / "libnetty_tcnative.so")
    return [f"--host_jvm_args=-Djava.library.path=/usr/share/bazel/:{jni}"]


class TlsClient:
    """One workspace and one Bazel server (the TLS startup option fixed), built with whatever
    credentials each call gives."""

    def __init__(self, tmp_path: Path, service: RunningService, pki: Pki) -> None:
        self.service, self.pki = service, pki
        root = tmp_path / "client"
        root.mkdir()
        self.workspace = make_workspace(root, BUILD, {"input.txt": "through tls\n"})
        self.bazel = Bazel(self.workspace, root / "root", tls_startup_options(tmp_path))

    def build(
        self,
        *,
        client: bool = True,
        token: str | None = TOKEN,
        client_files: tuple[Path, Path] | None = None,
    ) -> BazelRun:
        flags = [
            f"--remote_executor=grpcs://{self.service.address}",
            f"--tls_certificate={self.pki.server_ca.cert_file}",
            f"--remote_default_exec_properties=container-image=docker://{IMAGE_A}",
            "--shell_executable=/bin/sh",
            "--remote_retries=0",
        ]
        if client:
            cert, key = client_files or (self.pki.client.cert_file, self.pki.client.key_file)
            flags += [f"--tls_client_certificate={cert}", f"--tls_client_key={key}"]
        if token is not None:
            flags.append(f"--remote_header=Authorization=Bearer {token}")
        run = self.bazel.run("build", *flags, "//:hello")
        if run.returncode == 0:
            run.output += "\n@@ " + (self.workspace / "bazel-bin" / "hello.txt").read_text()
        return run


@pytest.fixture
def client(tmp_path: Path, secured_service: RunningService, pki: Pki) -> Iterator[TlsClient]:
    tls_client = TlsClient(tmp_path, secured_service, pki)
    try:
        yield tls_client
    finally:
        tls_client.bazel.shutdown()


def test_bazel_builds_remotely_with_a_client_certificate_and_a_token(client: TlsClient) -> None:
    run = client.build()
    assert run.returncode == 0, run.output
    assert run.process_counts().get("remote") == 1, run.output
    assert "@@ image-a\nthrough tls\n" in run.output


def test_bazel_without_valid_credentials_is_turned_away(
    client: TlsClient, secured_service: RunningService, pki: Pki, tmp_path: Path
) -> None:
    """No token and a wrong token: UNAUTHENTICATED, in Bazel's words. No client certificate,
    or an expired one: the TLS handshake fails. None of them runs anything."""
    expired = issue(tmp_path / "x", "expired", pki.client_ca, server=False, valid_days=(-9, -1))
    refused = {
        "no token": client.build(token=None),
        "wrong token": client.build(token="x" * 24),
        "no certificate": client.build(client=False),
        "expired certificate": client.build(client_files=(expired.cert_file, expired.key_file)),
    }
    for case, run in refused.items():
        assert run.returncode != 0, (case, run.output)
        assert "Failed to query remote execution capabilities" in run.output, (case, run.output)
        assert "remote" not in run.process_counts(), (case, run.output)
    for case in ("no token", "wrong token"):
        assert "UNAUTHENTICATED" in refused[case].output, refused[case].output
    execution = secured_service.service.execution
    assert execution is not None
    assert all(pool.stats.created == 0 for pool in execution.pools.pools)
