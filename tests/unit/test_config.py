from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from worker.config import load_settings


def test_defaults_bind_loopback() -> None:
    assert load_settings().server.listen == "127.0.0.1:8980"


def test_yaml_file_then_environment_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  listen: 127.0.0.1:1111\nstorage:\n  max_bytes: 2097152\n")
    assert load_settings(config).server.listen == "127.0.0.1:1111"
    monkeypatch.setenv("SIDECAR_EXECUTOR_SERVER__LISTEN", "127.0.0.1:2222")
    settings = load_settings(config)
    assert settings.server.listen == "127.0.0.1:2222"
    assert settings.storage.max_bytes == 2097152
    assert load_settings(config, server={"listen": "127.0.0.1:3333"}).server.listen == (
        "127.0.0.1:3333"
    )


def test_unknown_field_in_file_is_an_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("storage:\n  max_bytez: 5\n")
    with pytest.raises(pydantic.ValidationError, match="max_bytez"):
        load_settings(config)


def test_batch_limit_must_fit_in_a_message() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_batch_total_size_bytes"):
        load_settings(storage={"max_batch_total_size_bytes": 64 << 20})


def test_missing_config_file_is_reported() -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(Path("/nonexistent/config.yaml"))


def test_image_pool_entries_inherit_what_they_do_not_set_from_the_default_pool() -> None:
    """An entry with only min_idle used to drop the default pool's limits and max_sidecars."""
    settings = load_settings(
        execution={
            "pool": {"max_sidecars": 7, "memory_bytes": 1 << 30, "dispatch": "agent"},
            "image_pools": {"docker://golang:1.20": {"min_idle": 2}},
        }
    )
    pool = settings.execution.pool_for("golang:1.20")
    assert (pool.min_idle, pool.max_sidecars, pool.memory_bytes, pool.dispatch) == (
        2,
        7,
        1 << 30,
        "agent",
    )
    assert settings.execution.pool_for("other:1").min_idle == 0


def test_health_listen_is_host_and_port_and_not_the_reapi_address() -> None:
    assert load_settings().server.health_listen is None
    assert load_settings(server={"health_listen": "0.0.0.0:8981"}).server.health_listen == (
        "0.0.0.0:8981"
    )
    with pytest.raises(pydantic.ValidationError, match="health_listen"):
        load_settings(server={"health_listen": "8981"})
    with pytest.raises(pydantic.ValidationError, match="health_listen must not be"):
        load_settings(server={"listen": "127.0.0.1:8980", "health_listen": "127.0.0.1:8980"})
