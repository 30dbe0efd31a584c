"""Fixtures shared by all test layers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import RunningService, running_service
from worker.config import Settings, load_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A cache-only server (no Docker needed); execution tests build their own settings."""
    return load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0"},
        execution={"enabled": False},
    )


@pytest.fixture
def service(settings: Settings) -> Iterator[RunningService]:
    with running_service(settings) as running:
        yield running


@pytest.fixture(scope="session")
def test_images() -> None:
    """Builds the offline test images once per session (needs the Docker daemon)."""
    from tests.images import ensure_test_images

    ensure_test_images()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A temporary directory the actions' user (65534, when the runner runs on this host) can
    reach: pytest's own are root-only (0700)."""
    directory = Path(tempfile.mkdtemp(prefix="reachable-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture(params=["exec", "agent"])
def dispatch(request: pytest.FixtureRequest) -> str:
    """Both ways of starting actions (execution.pool.dispatch): every test that asks for it,
    directly or through exec_settings, runs once with each."""
    return str(request.param)


@pytest.fixture
def exec_settings(tmp_path: Path, test_images: None, dispatch: str) -> Settings:
    """A server with execution: small pools, short timeouts, test images allowed."""
    return load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0", "worker_name": f"test-{tmp_path.name}"},
        execution={
            "max_concurrent_actions": 4,
            "default_timeout_s": 60,
            "max_timeout_s": 120,
            "pull_timeout_s": 20,
            "daemon_wait_s": 2,
            "allowed_images": ["sidecar-test/*", "registry.invalid/*"],
            "pool": {"max_sidecars": 2, "dispatch": dispatch},
        },
    )


@pytest.fixture
def exec_service(exec_settings: Settings) -> Iterator[RunningService]:
    with running_service(exec_settings) as running:
        yield running
