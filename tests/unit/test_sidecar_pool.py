"""SidecarPool logic with an in-memory create/destroy and a fake clock: no Docker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from worker.config import ExecutionSettings, PoolSettings, load_settings
from worker.pool.pools import SidecarPools
from worker.pool.sidecar_pool import PoolKey, Sidecar, SidecarPool
from worker.runtime.fake import FakeContainerRuntime
from worker.runtime.protocol import RuntimeUnavailable

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


@pytest.mark.anyio
async def test_lease_at_max_sidecars_replaces_idle_sidecars_past_max_age() -> None:
    """Every sidecar idle but too old: a lease must not wait for one to be returned (none
    will be). Before 916c41e it did wait, and maintain() removed the old sidecars without
    waking it, so it waited forever."""
    pool, containers, clock = make_pool(max_sidecars=2, max_age_s=60)
    first, second = await pool.lease(), await pool.lease()
    await pool.release(first, reusable=True)
    await pool.release(second, reusable=True)
    clock.now += 61
    waiter = asyncio.create_task(pool.lease())
    await settle()
    await pool.maintain(containers.is_alive)
    fresh = await asyncio.wait_for(waiter, 1)
    assert fresh not in (first, second)
    await settle()
    assert sorted(containers.destroyed) == ["c0", "c1"]
    assert containers.created == ["c0", "c1", "c2"]


@pytest.mark.anyio
async def test_lease_does_not_wait_for_upkeep_to_remove_worn_out_sidecars() -> None:
    """The lease itself makes room: no waiting for the next maintain() (seconds away)."""
    pool, containers, clock = make_pool(max_sidecars=1, max_age_s=60)
    old = await pool.lease()
    await pool.release(old, reusable=True)
    clock.now += 61
    fresh = await asyncio.wait_for(pool.lease(), 1)
    assert fresh is not old and pool.stats.waits == 0
    await settle()
    assert containers.destroyed == ["c0"]


def fake_pools(
    tmp_path: Path, runtime: FakeContainerRuntime, settings: ExecutionSettings
) -> SidecarPools:
    """The real SidecarPools on the fake runtime."""
    sidecars = tmp_path / "sidecars"
    sidecars.mkdir()
    return SidecarPools(
        runtime=runtime,
        settings=settings,
        worker_id="0" * 32,
        worker_name="pool-test",
        sidecars_dir=sidecars,
        runner_dir=tmp_path / "runner",
        limiter=anyio.CapacityLimiter(4),
    )


@pytest.mark.anyio
async def test_pool_with_a_waiting_lease_is_not_dropped_as_empty(tmp_path: Path) -> None:
    """A lease waits at max_sidecars; the sidecar it waits for is destroyed, and upkeep runs
    before the waiter wakes: the pool has no sidecar then, but must not be forgotten, or the
    waiter's new sidecar would live in a pool no one maintains, next to a second pool of the
    same key that ignores its max_sidecars."""
    runtime = FakeContainerRuntime()
    image_id = runtime.add_image("sidecar-test/fake:1")
    settings = load_settings(
        data_dir=tmp_path, execution={"pool": {"max_sidecars": 1, "min_idle": 0}}
    ).execution
    pools = fake_pools(tmp_path, runtime, settings)
    key = PoolKey(image_id, "65534:65534", "none", None, None, None)
    pool = pools.pool_for(key, "sidecar-test/fake:1")
    held = await pool.lease()
    waiter = asyncio.create_task(pool.lease())
    await settle()
    assert not waiter.done()
    # The release wakes the waiter, and upkeep runs before it gets to run.
    await asyncio.gather(pool.release(held, reusable=False), pools.maintain_all())
    assert pools.pools == [pool]
    fresh = await asyncio.wait_for(waiter, 1)
    assert pools.pool_for(key, "sidecar-test/fake:1") is pool
    assert pool.sidecars == [fresh]
    await pools.close()
    assert runtime.containers == {}


@pytest.mark.anyio
async def test_a_sidecar_the_daemon_could_not_remove_is_removed_by_later_upkeep(
    tmp_path: Path,
) -> None:
    """A sidecar destroyed while the daemon was away used to stay until the worker restarted;
    upkeep now retries its removal, container and directory both."""
    runtime = FakeContainerRuntime()
    image_id = runtime.add_image("sidecar-test/fake:1")
    settings = load_settings(data_dir=tmp_path).execution
    pools = fake_pools(tmp_path, runtime, settings)
    key = PoolKey(image_id, "65534:65534", "none", None, None, None)
    pool = pools.pool_for(key, "sidecar-test/fake:1")
    sidecar = await pool.lease()
    assert sidecar.directory is not None and sidecar.directory.exists()
    runtime.fail_next("remove_container", RuntimeUnavailable("daemon restarting"))
    await pool.release(sidecar, reusable=False)
    assert sidecar.container_id in runtime.containers  # the daemon was away
    await pools.maintain_all()
    assert sidecar.container_id not in runtime.containers
    assert not sidecar.directory.exists()
    await pools.close()
