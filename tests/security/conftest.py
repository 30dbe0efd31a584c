"""Shared pieces of the attack tests: services to attack, a host canary, a CAS integrity check."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.execution_client import ActionSpec, shell_action
from tests.images import HOSTILE
from tests.serving import RunningService, running_service
from worker.config import Settings, load_settings

HOSTILE_PLATFORM = {"container-image": f"docker://{HOSTILE}"}
ROOT_PLATFORM = {**HOSTILE_PLATFORM, "dockerRunAsRoot": "true"}


def hostile(script: str, **fields: object) -> ActionSpec:
    return shell_action(script, HOSTILE, **fields)


def attack_settings(
    tmp_path: Path, dispatch: str = "exec", max_sidecars: int = 2, **execution: object
) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0", "worker_name": f"attack-{tmp_path.name}"},
        execution={
            "default_timeout_s": 60,
            "max_timeout_s": 120,
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": max_sidecars, "dispatch": dispatch},
            **execution,
        },
    )


@pytest.fixture
def attacked(tmp_path: Path, test_images: None, dispatch: str) -> Iterator[RunningService]:
    """The default configuration: actions as 65534, root refused."""
    with running_service(attack_settings(tmp_path, dispatch)) as service:
        yield service


@pytest.fixture
def one_sidecar(tmp_path: Path, test_images: None, dispatch: str) -> Iterator[RunningService]:
    """Every action runs in the same sidecar, one after another."""
    settings = attack_settings(tmp_path, dispatch, max_sidecars=1)
    with running_service(settings) as service:
        yield service


@pytest.fixture
def root_allowed(tmp_path: Path, test_images: None, dispatch: str) -> Iterator[RunningService]:
    with running_service(attack_settings(tmp_path, dispatch, allow_root=True)) as service:
        yield service


@dataclass
class Canary:
    """A root-only host file that no action may ever read or change."""

    path: Path
    secret: bytes

    def assert_untouched(self) -> None:
        info = self.path.lstat()
        assert self.path.read_bytes() == self.secret
        assert (info.st_uid, info.st_mode & 0o7777) == (0, 0o600)


@pytest.fixture
def canary(tmp_path: Path) -> Canary:
    path = tmp_path / "host-secret"
    secret = f"host secret {secrets.token_hex(16)}\n".encode()
    path.write_bytes(secret)
    path.chmod(0o600)
    return Canary(path, secret)


def assert_cas_intact(service: RunningService, canary: Canary | None = None) -> int:
    """Every stored blob (and executable copy) still hashes to its name, and none holds the
    canary's secret. Returns how many blobs were checked."""
    cas = service.service.settings.data_dir / "cas"
    checked = 0
    for folder in (cas / "blobs", cas / "executables"):
        for directory, _, names in os.walk(folder):
            for name in names:
                data = (Path(directory) / name).read_bytes()
                assert hashlib.sha256(data).hexdigest() == name, f"blob {name} was changed"
                if canary is not None:
                    assert canary.secret not in data, f"blob {name} holds the host secret"
                checked += 1
    return checked
