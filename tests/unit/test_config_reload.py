"""ConfigReloader on a real file: a change is noticed and applied, an invalid file is rejected
with a logged, named error and nothing applied, a request (SIGHUP) reloads an unchanged file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import yaml

from worker.admin.reload import ConfigReloader, restart_only_changes, with_live_fields
from worker.commands.common import ConfigError, settings_from_args
from worker.config import Settings, load_settings


def write(path: Path, min_idle: int, queue_size: int = 1000) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(path.parent / "data"),
                "execution": {
                    "queue_size": queue_size,
                    "image_pools": {"docker://img:1": {"min_idle": min_idle}},
                },
            }
        )
    )


async def until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while True:
            if check():
                return
            await anyio.sleep(0.02)


def loader(path: Path) -> Settings:
    class Args:
        config = path
        data_dir = None

    return settings_from_args(Args())  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_changed_file_is_applied_and_an_invalid_one_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yaml"
    write(path, 1)
    applied: list[Settings] = []

    async def apply(settings: Settings) -> None:
        applied.append(settings)

    reloader = ConfigReloader(path, lambda: loader(path), apply, interval_s=0.02)
    reloader.start()
    try:
        await anyio.sleep(0.1)
        assert applied == []  # nothing changed yet
        write(path, 3)
        await until(lambda: bool(applied))
        assert applied[-1].execution.pool_for("img:1").min_idle == 3
        with caplog.at_level(logging.ERROR):
            path.write_text("execution: {image_pools: {'img:1': {min_idle: -2}}}\n")
            await until(lambda: reloader.rejected > 0)
        assert len(applied) == 1
        assert "rejected, the running settings stay: ConfigError" in caplog.text
        assert "image_pools.img:1.min_idle" in caplog.text
        reloader.request()  # SIGHUP with the (still invalid) file: rejected again
        await until(lambda: reloader.rejected >= 2)
        write(path, 2)
        reloader.request()
        await until(lambda: len(applied) >= 2)
    finally:
        await reloader.close()


def test_only_pool_settings_apply_live_and_the_rest_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    write(path, 1)
    running = loader(path)
    write(path, 4, queue_size=7)
    loaded = loader(path)
    assert restart_only_changes(running, loaded) == ["execution.queue_size"]
    merged = with_live_fields(running, loaded)
    assert merged.execution.queue_size == 1000
    assert merged.execution.pool_for("img:1").min_idle == 4


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        loader(tmp_path / "missing.yaml")
    assert load_settings(data_dir=tmp_path).admin_address == f"unix:{tmp_path / 'admin.sock'}"
