"""Fixtures shared by all test layers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import RunningService, running_service
from worker.config import Settings, load_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", server={"listen": "127.0.0.1:0"})


@pytest.fixture
def service(settings: Settings) -> Iterator[RunningService]:
    with running_service(settings) as running:
        yield running
