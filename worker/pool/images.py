"""Turns image references into local image IDs, pulling each missing image once (single flight)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import anyio

from worker.errors import FailedPrecondition, Unavailable
from worker.runtime.protocol import ImageUnavailable, RuntimeUnavailable

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """The part of a ContainerRuntime that images need."""

    def local_image_id(self, reference: str) -> str | None: ...

    def pull_image(self, reference: str) -> str: ...


class ImageResolver:
    """A locally present image is used as is (never re-pulled); a missing one is pulled once
    however many actions wait for it, with a timeout. A failed pull fails those actions with
    FAILED_PRECONDITION naming the image and the daemon's message, and is not remembered, so a
    later action tries again."""

    def __init__(
        self,
        runtime: ImageSource,
        limiter: anyio.CapacityLimiter,
        pull_timeout_s: float,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._runtime = runtime
        self._limiter = limiter
        self._pull_timeout_s = pull_timeout_s
        self._cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._resolved: dict[str, tuple[str, float]] = {}
        self._pulls: dict[str, asyncio.Task[str]] = {}

    async def resolve(self, reference: str) -> str:
        cached = self._resolved.get(reference)
        if cached is not None and self._clock() - cached[1] < self._cache_ttl_s:
            return cached[0]
        pull = self._pulls.get(reference)
        if pull is None:
            pull = asyncio.create_task(self._find_or_pull(reference))
            self._pulls[reference] = pull
            pull.add_done_callback(lambda _: self._pulls.pop(reference, None))
        image_id = await asyncio.shield(pull)
        self._resolved[reference] = (image_id, self._clock())
        return image_id

    async def _find_or_pull(self, reference: str) -> str:
        try:
            local = await anyio.to_thread.run_sync(
                self._runtime.local_image_id, reference, limiter=self._limiter
            )
            if local is not None:
                return local
            log.info("pulling image %s", reference)
            with anyio.fail_after(self._pull_timeout_s):
                # The thread is abandoned on timeout; docker-py's own timeout ends it later.
                return await anyio.to_thread.run_sync(
                    self._runtime.pull_image, reference, abandon_on_cancel=True
                )
        except TimeoutError:
            raise FailedPrecondition(
                f"image {reference!r} could not be pulled within {self._pull_timeout_s:g} s"
            ) from None
        except ImageUnavailable as error:
            raise FailedPrecondition(f"image {reference!r} could not be pulled: {error}") from None
        except RuntimeUnavailable as error:
            raise Unavailable(f"image {reference!r}: {error}") from None
