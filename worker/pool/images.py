"""Turns image references into local image IDs by pull policy, each pull once (single flight)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import anyio

from worker.errors import FailedPrecondition, Unavailable
from worker.pool.events import NoEvents, PoolEvents
from worker.runtime.protocol import ImageUnavailable, RuntimeUnavailable

log = logging.getLogger(__name__)

# References remembered (resolved IDs, last pull times) before the memory is cleared.
MAX_REMEMBERED = 4096


V = TypeVar("V")


def _remember(into: dict[str, V], reference: str, value: V) -> None:
    """References are named by clients: forgetting them all now and then costs at most an
    extra look-up or pull, and keeps endless made-up names from piling up."""
    if reference not in into and len(into) >= MAX_REMEMBERED:
        into.clear()
    into[reference] = value


class ImageSource(Protocol):
    """The part of a ContainerRuntime that images need."""

    def local_image_id(self, reference: str) -> str | None: ...

    def pull_image(self, reference: str) -> str: ...


def is_digest(reference: str) -> bool:
    """An image named by content (`name@sha256:...` or an image ID) never changes."""
    return "@sha256:" in reference or reference.startswith("sha256:")


class ImageResolver:
    """Turns a reference into a local image ID, by pull policy:

    - `if_not_present`: a locally present image is used as is (never re-pulled); a missing one
      is pulled.
    - `always`: a tag is pulled again when its last pull is older than the interval, so a tag
      that moved upstream reaches the worker. A pull that fails while the tag is present
      locally keeps the local image (logged): a registry outage must not stop a worker whose
      images are there. An image named by digest is never pulled again.

    Pulls are single flight (one pull however many actions wait) with a timeout. A failed
    pull of a missing image fails those actions with FAILED_PRECONDITION naming the image and
    the daemon's message, and is not remembered, so a later action tries again."""

    def __init__(
        self,
        runtime: ImageSource,
        limiter: anyio.CapacityLimiter,
        pull_timeout_s: float,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        events: PoolEvents | None = None,
    ) -> None:
        self._runtime = runtime
        self._limiter = limiter
        self._pull_timeout_s = pull_timeout_s
        self._cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._events: PoolEvents = events or NoEvents()
        self._resolved: dict[str, tuple[str, float]] = {}
        self._pulled_at: dict[str, float] = {}
        self._pulls: dict[str, asyncio.Task[str]] = {}

    async def resolve(
        self, reference: str, policy: str = "if_not_present", pull_interval_s: float = 300.0
    ) -> str:
        now = self._clock()
        pull_due = (
            policy == "always"
            and not is_digest(reference)
            and now - self._pulled_at.get(reference, -float("inf")) >= pull_interval_s
        )
        cached = self._resolved.get(reference)
        if not pull_due and cached is not None and now - cached[1] < self._cache_ttl_s:
            return cached[0]
        return await self._single_flight(reference, pull_due)

    async def refresh(self, reference: str) -> str:
        """Re-resolves a tag now, pulling it (pools refresh): the ID it names now."""
        return await self._single_flight(reference, True)

    async def _single_flight(self, reference: str, pull: bool) -> str:
        task = self._pulls.get(reference)
        if task is None:
            task = asyncio.create_task(self._find_or_pull(reference, pull))
            self._pulls[reference] = task
            task.add_done_callback(lambda _: self._pulls.pop(reference, None))
        image_id = await asyncio.shield(task)
        _remember(self._resolved, reference, (image_id, self._clock()))
        return image_id

    async def _local(self, reference: str) -> str | None:
        return await anyio.to_thread.run_sync(
            self._runtime.local_image_id, reference, limiter=self._limiter
        )

    async def _find_or_pull(self, reference: str, pull: bool) -> str:
        try:
            local = await self._local(reference)
            if local is not None and not pull:
                return local
            return await self._pull(reference, fallback=local)
        except RuntimeUnavailable as error:
            raise Unavailable(f"image {reference!r}: {error}") from None

    async def _pull(self, reference: str, fallback: str | None) -> str:
        log.info("pulling image %s", reference)
        started = self._clock()
        try:
            with anyio.fail_after(self._pull_timeout_s):
                # The thread is abandoned on timeout; docker-py's own timeout ends it later.
                image_id = await anyio.to_thread.run_sync(
                    self._runtime.pull_image, reference, abandon_on_cancel=True
                )
        except (TimeoutError, ImageUnavailable) as error:
            self._events.image_pulled(reference, self._clock() - started, ok=False)
            # Tried: not again before the interval.
            _remember(self._pulled_at, reference, self._clock())
            message = (
                f"could not be pulled within {self._pull_timeout_s:g} s"
                if isinstance(error, TimeoutError)
                else f"could not be pulled: {error}"
            )
            if fallback is not None:
                log.warning("image %s %s; the local image stays in use", reference, message)
                return await self._local(reference) or fallback
            raise FailedPrecondition(f"image {reference!r} {message}") from None
        self._events.image_pulled(reference, self._clock() - started, ok=True)
        _remember(self._pulled_at, reference, self._clock())
        return image_id
