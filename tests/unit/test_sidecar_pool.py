"""SidecarPool logic with an in-memory create/destroy and a fake clock: no Docker."""

from __future__ import annotations

import asyncio

import pytest

from worker.config import PoolSettings
from worker.pool.sidecar_pool import PoolKey, Sidecar, SidecarPool

KEY = PoolKey("sha256:img", "65534:65534", "none", None, None, None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Containers:
    """Stands in for the runtime: creates and destroys named sidecars, remembers which."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.alive: set[str] = set()
        self.refuse = False

    async def create(self, key: PoolKey) -> Sidecar:
        await asyncio.sleep(0)
        if self.refuse:
            raise OSError("daemon said no")
        name = f"c{len(self.created)}"
        self.created.append(name)
        self.alive.add(name)
        return Sidecar(name, key, created_at=self.clock(), last_used=self.clock())

    async def destroy(self, sidecar: Sidecar) -> None:
        self.destroyed.append(sidecar.container_id)
        self.alive.discard(sidecar.container_id)

    async def is_alive(self, sidecar: Sidecar) -> bool:
        return sidecar.container_id in self.alive


def make_pool(**settings: object) -> tuple[SidecarPool, Containers, Clock]:
    clock = Clock()
    containers = Containers(clock)
    pool = SidecarPool(
        KEY, PoolSettings.model_validate(settings), containers.create, containers.destroy, clock
    )
    return pool, containers, clock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_a_returned_sidecar_is_reused() -> None:
    pool, containers, _ = make_pool()
    first = await pool.lease()
    await pool.release(first, reusable=True)
    second = await pool.lease()
    assert second is first and containers.created == ["c0"]


@pytest.mark.anyio
async def test_unreusable_sidecar_is_destroyed_and_replaced() -> None:
    pool, containers, _ = make_pool()
    first = await pool.lease()
    await pool.release(first, reusable=False)
    await settle()
    second = await pool.lease()
    assert second is not first
    assert containers.destroyed == ["c0"] and containers.created == ["c0", "c1"]


@pytest.mark.anyio
async def test_lease_waits_at_max_sidecars_until_one_is_returned() -> None:
    pool, containers, _ = make_pool(max_sidecars=1)
    held = await pool.lease()
    waiter = asyncio.create_task(pool.lease())
    await settle()
    assert not waiter.done()
    await pool.release(held, reusable=True)
    assert await asyncio.wait_for(waiter, 1) is held
    assert pool.stats.waits == 1 and containers.created == ["c0"]


@pytest.mark.anyio
async def test_several_actions_share_a_sidecar_when_configured() -> None:
    pool, containers, _ = make_pool(actions_per_sidecar=3, max_sidecars=1)
    leased = [await pool.lease() for _ in range(3)]
    assert len({id(s) for s in leased}) == 1 and leased[0].active == 3


@pytest.mark.anyio
async def test_sidecar_is_recycled_after_max_actions_and_max_age() -> None:
    pool, containers, clock = make_pool(max_actions_per_sidecar=2, max_age_s=60)
    for _ in range(2):
        await pool.release(await pool.lease(), reusable=True)
    await settle()
    assert containers.destroyed == ["c0"]
    young = await pool.lease()
    await pool.release(young, reusable=True)
    clock.now += 61
    assert await pool.lease() is not young


@pytest.mark.anyio
async def test_maintain_prewarms_min_idle_and_sheds_idle_past_ttl() -> None:
    pool, containers, clock = make_pool(min_idle=1, idle_ttl_s=30, max_sidecars=3)
    await pool.maintain(containers.is_alive)
    assert containers.created == ["c0"]
    a, b = await pool.lease(), await pool.lease()
    await pool.release(a, reusable=True)
    await pool.release(b, reusable=True)
    clock.now += 31
    await pool.maintain(containers.is_alive)
    await settle()
    assert len(pool.sidecars) == 1  # min_idle stays warm


@pytest.mark.anyio
async def test_maintain_replaces_a_dead_idle_sidecar() -> None:
    pool, containers, _ = make_pool(min_idle=1)
    await pool.maintain(containers.is_alive)
    containers.alive.clear()  # the container died behind our back
    await pool.maintain(containers.is_alive)
    await settle()
    assert containers.destroyed == ["c0"]
    assert [s.container_id for s in pool.sidecars] == ["c1"]


@pytest.mark.anyio
async def test_failed_creation_frees_its_place() -> None:
    pool, containers, _ = make_pool(max_sidecars=1)
    containers.refuse = True
    with pytest.raises(OSError):
        await pool.lease()
    containers.refuse = False
    assert (await pool.lease()).container_id == "c0"


@pytest.mark.anyio
async def test_pool_is_empty_only_without_sidecars_or_creations() -> None:
    pool, containers, clock = make_pool(idle_ttl_s=10)
    assert pool.is_empty
    sidecar = await pool.lease()
    assert not pool.is_empty
    await pool.release(sidecar, reusable=True)
    clock.now += 11
    await pool.maintain(containers.is_alive)
    assert pool.is_empty
