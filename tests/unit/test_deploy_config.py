"""The configuration shipped in deploy/ must be valid for the settings model."""

from __future__ import annotations

from pathlib import Path

import yaml

from worker.config import load_settings

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "worker.yaml"


def test_kubernetes_configmap_holds_a_valid_configuration(tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    (config_map,) = [d for d in documents if d["kind"] == "ConfigMap"]
    config = tmp_path / "config.yaml"
    config.write_text(config_map["data"]["config.yaml"])
    settings = load_settings(config)
    assert settings.execution.docker_url == "unix:///var/run/dind/docker.sock"
    assert settings.execution.pool_for("golang:1.20").min_idle == 2
