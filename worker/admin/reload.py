"""Configuration reload while running: on a change of the config file (a Kubernetes ConfigMap
update reaches the pod as one) and on SIGHUP. Only pool settings (execution.pool and
execution.image_pools) apply live; a change of anything else is logged as needing a restart.
An invalid file is rejected with a logged, named error and the running settings stay."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from worker.config import Settings

log = logging.getLogger(__name__)

LIVE_FIELDS = ("pool", "image_pools")


def _changed_paths(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted({*old, *new}, key=str):
            paths += _changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return paths
    return [] if old == new else [prefix.lstrip(".")]


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """Settings that differ but apply only after a restart."""
    before = old.model_dump(mode="json")
    after = new.model_dump(mode="json")
    for dump in (before, after):
        for name in LIVE_FIELDS:
            dump["execution"].pop(name, None)
    return _changed_paths(before, after, "")


def with_live_fields(running: Settings, loaded: Settings) -> Settings:
    """The running settings with the loaded file's pool settings."""
    execution = running.execution.model_copy(
        update={name: getattr(loaded.execution, name) for name in LIVE_FIELDS}
    )
    return running.model_copy(update={"execution": execution})


class ConfigReloader:
    """Watches the config file's content every `interval_s` (0: only on request) and calls
    `apply` with newly loaded settings; `load` raises on an invalid file."""

    def __init__(
        self,
        path: Path | None,
        load: Callable[[], Settings],
        apply: Callable[[Settings], Awaitable[None]],
        interval_s: float,
    ) -> None:
        self._path = path
        self._load = load
        self._apply = apply
        self._interval_s = interval_s
        self._wanted = asyncio.Event()
        self._seen = self._fingerprint()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # applied
        self.rejected = 0

    def _fingerprint(self) -> bytes | None:
        if self._path is None:
            return None
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def request(self) -> None:
        """Reload now (SIGHUP)."""
        self._wanted.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            timeout = self._interval_s if self._interval_s > 0 and self._path else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                    await self._wanted.wait()
            requested = self._wanted.is_set()
            self._wanted.clear()
            seen = self._fingerprint()
            if not requested and seen == self._seen:
                continue
            self._seen = seen
            await self.reload("SIGHUP" if requested else f"{self._path} changed")

    async def reload(self, why: str) -> bool:
        try:
            loaded = self._load()
        except Exception as error:
            self.rejected += 1
            log.error(
                "configuration reload (%s) rejected, the running settings stay: %s: %s",
                why,
                type(error).__name__,
                error,
            )
            return False
        try:
            await self._apply(loaded)
        except Exception:
            self.rejected += 1
            log.exception("configuration reload (%s) could not be applied", why)
            return False
        self.reloads += 1
        return True
