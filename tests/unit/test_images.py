"""ImageResolver with a fake runtime: single-flight pulls, failures, timeouts."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest

from worker.errors import FailedPrecondition
from worker.pool.images import ImageResolver
from worker.runtime.protocol import ImageUnavailable


class FakeRuntime:
    """Only the image calls; pulls take `pull_s` and can be made to fail."""

    def __init__(self, local: set[str], pull_s: float = 0.05, fail: str | None = None) -> None:
        self.local = set(local)
        self.pull_s = pull_s
        self.fail = fail
        self.pulls: list[str] = []
        self._lock = threading.Lock()

    def local_image_id(self, reference: str) -> str | None:
        return f"sha256:{reference}" if reference in self.local else None

    def pull_image(self, reference: str) -> str:
        with self._lock:
            self.pulls.append(reference)
        time.sleep(self.pull_s)
        if self.fail:
            raise ImageUnavailable(self.fail)
        self.local.add(reference)
        return f"sha256:{reference}"


def resolver(runtime: FakeRuntime, timeout_s: float = 5) -> ImageResolver:
    return ImageResolver(runtime, anyio.CapacityLimiter(8), timeout_s)


@pytest.mark.anyio
async def test_present_image_is_never_pulled() -> None:
    runtime = FakeRuntime({"a:1"})
    assert await resolver(runtime).resolve("a:1") == "sha256:a:1"
    assert runtime.pulls == []


@pytest.mark.anyio
async def test_many_waiters_share_one_pull() -> None:
    runtime = FakeRuntime(set())
    images = resolver(runtime)
    ids = await asyncio.gather(*(images.resolve("b:2") for _ in range(10)))
    assert set(ids) == {"sha256:b:2"}
    assert runtime.pulls == ["b:2"]


@pytest.mark.anyio
async def test_failed_pull_names_the_image_and_the_daemon_message_and_is_retried_later() -> None:
    runtime = FakeRuntime(set(), fail="manifest unknown")
    images = resolver(runtime)
    results = await asyncio.gather(
        *(images.resolve("c:3") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, FailedPrecondition) for r in results)
    assert "c:3" in str(results[0]) and "manifest unknown" in str(results[0])
    assert runtime.pulls == ["c:3"]
    runtime.fail = None
    assert await images.resolve("c:3") == "sha256:c:3"


@pytest.mark.anyio
async def test_slow_pull_times_out_with_failed_precondition() -> None:
    runtime = FakeRuntime(set(), pull_s=2)
    with pytest.raises(FailedPrecondition, match="within 0.2 s"):
        await resolver(runtime, timeout_s=0.2).resolve("slow:1")
