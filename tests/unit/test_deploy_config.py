"""The configuration shipped in deploy/ must be valid for the settings model."""

from __future__ import annotations

from pathlib import Path

from worker.config import load_settings

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base" / "config.yaml"


def test_kubernetes_config_is_a_valid_configuration() -> None:
    settings = load_settings(CONFIG)
    assert settings.execution.docker_url == "unix:///var/run/dind/docker.sock"
    assert settings.exec_root == Path("/data/exec")
