"""Operators' changes to running pools (scale, drain, recycle, refresh, reload), autoscaling,
pull policies and the one-direction rule between pool/ and execution/; fakes only, no Docker."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import anyio
import pytest

from tests.unit.test_sidecar_pool import Clock, Containers, fake_pools, settle
from worker.config import PoolSettings, load_settings
from worker.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from worker.pool.images import ImageResolver
from worker.pool.pools import SidecarPools
from worker.pool.sidecar_pool import PoolDrained, PoolKey, SidecarPool
from worker.runtime.fake import FakeContainerRuntime
from worker.runtime.protocol import ImageUnavailable

KEY = PoolKey("sha256:img", "65534:65534", "none", None, None, None)
IMAGE = "sidecar-test/fake:1"


class SlowContainers(Containers):
    """Creating a sidecar takes `create_s` seconds of the fake clock (a cold start)."""

    create_s = 0.0

    async def create(self, key: PoolKey) -> object:  # type: ignore[override]
        self.clock.now += self.create_s
        return await super().create(key)


@pytest.fixture(autouse=True)
def exec_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake runtime models `docker exec` of the runner; the agent runs only in real
    sidecars (tests/integration/test_agent_dispatch.py), so these pools use exec."""
    monkeypatch.setenv("SIDECAR_EXECUTOR_EXECUTION__POOL__DISPATCH", "exec")


def make_pool(**settings: object) -> tuple[SidecarPool, SlowContainers, Clock]:
    clock = Clock()
    containers = SlowContainers(clock)
    pool = SidecarPool(
        KEY,
        PoolSettings.model_validate(settings),
        containers.create,  # type: ignore[arg-type]
        containers.destroy,
        clock,
        reference=IMAGE,
    )
    return pool, containers, clock


# ------------------------------------------------------------ one pool


@pytest.mark.anyio
async def test_drained_pool_refuses_leases_lets_running_actions_finish_then_sheds() -> None:
    pool, containers, _ = make_pool(min_idle=1)
    await pool.maintain(containers.is_alive)
    busy = await pool.lease()
    await pool.maintain(containers.is_alive)  # min_idle: one more warm
    assert len(pool.sidecars) == 2
    await pool.drain()
    await settle()
    assert [s.container_id for s in pool.sidecars] == [busy.container_id]  # idle one gone
    with pytest.raises(PoolDrained, match="drained by an operator"):
        await pool.lease()
    await pool.release(busy, reusable=True)
    await pool.maintain(containers.is_alive)
    await settle()
    assert pool.sidecars == [] and sorted(containers.destroyed) == ["c0", "c1"]
    assert pool.stats.retired["operator"] == 2


@pytest.mark.anyio
async def test_drained_pool_with_when_drained_wait_holds_leases_until_resumed() -> None:
    pool, _, _ = make_pool(when_drained="wait")
    await pool.drain()
    waiter = asyncio.create_task(pool.lease())
    await settle()
    assert not waiter.done() and pool.waiting == 1
    await pool.resume()
    assert (await asyncio.wait_for(waiter, 1)).container_id == "c0"


@pytest.mark.anyio
async def test_recycle_replaces_idle_sidecars_now_and_busy_ones_after_their_action() -> None:
    pool, containers, _ = make_pool(min_idle=1, max_sidecars=3)
    await pool.maintain(containers.is_alive)
    busy = await pool.lease()  # takes the warm c0
    await pool.maintain(containers.is_alive)  # c1 warm
    assert await pool.recycle() == 2
    await settle()
    assert containers.destroyed == ["c1"]
    await pool.release(busy, reusable=True)
    assert sorted(containers.destroyed) == ["c0", "c1"]
    await pool.maintain(containers.is_alive)
    assert [s.container_id for s in pool.sidecars] == ["c2"]  # min_idle again, fresh


@pytest.mark.anyio
async def test_lowering_max_sheds_idle_sidecars_and_retires_busy_ones_on_return() -> None:
    pool, containers, _ = make_pool(max_sidecars=3)
    leased = [await pool.lease() for _ in range(3)]
    await pool.release(leased[0], reusable=True)
    await pool.update(PoolSettings(max_sidecars=1))
    await pool.maintain(containers.is_alive)
    await settle()
    assert containers.destroyed == ["c0"]
    await pool.release(leased[1], reusable=True)  # still one too many
    assert containers.destroyed == ["c0", "c1"]
    await pool.release(leased[2], reusable=True)
    assert [s.container_id for s in pool.sidecars] == ["c2"]


@pytest.mark.anyio
async def test_a_slow_lease_grows_the_pool_ahead_of_demand_and_idle_ttl_takes_it_back() -> None:
    pool, containers, clock = make_pool(
        min_idle=0, max_sidecars=4, idle_ttl_s=30, scale_up_wait_s=0.5
    )
    containers.create_s = 2.0  # every cold start takes 2 s
    first = await pool.lease()
    assert pool.boost == 1 and pool.warm_target == 1
    await pool.maintain(containers.is_alive)
    second = await pool.lease()  # a warm one: no wait, no further growth
    assert second.container_id == "c1" and pool.boost == 1
    await pool.release(first, reusable=True)
    await pool.release(second, reusable=True)
    await pool.maintain(containers.is_alive)
    assert len(pool.sidecars) == 2  # inside the TTL nothing goes
    clock.now += 31
    await pool.maintain(containers.is_alive)
    await settle()
    assert pool.sidecars == [] and pool.boost == 0
    assert pool.stats.retired["idle_ttl"] == 2


@pytest.mark.anyio
async def test_growth_counts_the_waiting_leases_and_stops_at_max() -> None:
    pool, containers, clock = make_pool(min_idle=1, max_sidecars=3, scale_up_wait_s=0.5)
    held = [await pool.lease() for _ in range(3)]
    waiters = [asyncio.create_task(pool.lease()) for _ in range(3)]
    await settle()
    clock.now += 5  # they wait 5 s
    for sidecar in held:
        await pool.release(sidecar, reusable=True)
    await asyncio.gather(*waiters)
    assert pool.boost == 2  # max_sidecars - min_idle: never more than max
    await pool.maintain(containers.is_alive)
    assert len(pool.sidecars) <= 3


@pytest.mark.anyio
async def test_no_growth_without_scale_up_wait() -> None:
    pool, containers, _ = make_pool(max_sidecars=4)
    containers.create_s = 10.0
    await pool.lease()
    assert pool.boost == 0


# ----------------------------------------------------------- all pools


def pools_on_fake(tmp_path: Path, **execution: object) -> tuple[SidecarPools, FakeContainerRuntime]:
    runtime = FakeContainerRuntime()
    runtime.add_image(IMAGE)
    settings = load_settings(
        data_dir=tmp_path, execution={"allowed_images": ["sidecar-test/*"], **execution}
    ).execution
    return fake_pools(tmp_path, runtime, settings), runtime


@pytest.mark.anyio
async def test_scale_prewarms_at_once_and_refuses_bad_values(tmp_path: Path) -> None:
    pools, runtime = pools_on_fake(tmp_path)
    with pytest.raises(InvalidArgument, match="min_idle 5 is above max_sidecars 4"):
        await pools.scale(IMAGE, min_idle=5)
    with pytest.raises(InvalidArgument, match="negative"):
        await pools.scale(IMAGE, idle_ttl_s=-1)
    with pytest.raises(FailedPrecondition, match="allowed_images"):
        await pools.scale("other/image:1", min_idle=1)
    with pytest.raises(FailedPrecondition, match="could not be pulled"):
        await pools.scale("sidecar-test/missing:1", min_idle=1)
    await pools.scale(f"docker://{IMAGE}", min_idle=2)
    await pools.maintain_all()
    (pool,) = pools.pools
    assert pool.reference == IMAGE and len(pool.idle()) == 2
    assert len(runtime.containers) == 2
    await pools.scale(IMAGE, min_idle=0, idle_ttl_s=0.01)
    await anyio.sleep(0.05)
    await pools.maintain_all()
    await pools.maintain_all()
    await pools.close()  # waits for the removals under way
    assert pools.pools == [] and runtime.containers == {}
    await pools.close()


@pytest.mark.anyio
async def test_operator_actions_on_an_unknown_image_are_not_found(tmp_path: Path) -> None:
    pools, _ = pools_on_fake(tmp_path)
    for action in (pools.drain, pools.recycle, pools.refresh):
        with pytest.raises(NotFound, match="no pool of image"):
            await action("sidecar-test/never-used:1")
    with pytest.raises(InvalidArgument, match="digest"):
        await pools.refresh("sidecar-test/x@sha256:" + "0" * 64)
    await pools.close()


@pytest.mark.anyio
async def test_drain_outlives_an_empty_pool_and_scale_lifts_it(tmp_path: Path) -> None:
    pools, _ = pools_on_fake(tmp_path, image_pools={IMAGE: {"min_idle": 1}})
    await pools.maintain_all()  # what start() does, without the background upkeep
    assert await pools.drain(IMAGE) == 1
    await pools.maintain_all()
    (pool,) = pools.pools  # still listed, empty and drained
    assert pool.draining and pool.sidecars == []
    with pytest.raises(Unavailable):
        await pool.lease()
    await pools.scale(IMAGE)
    await pools.maintain_all()
    assert not pool.draining and len(pool.idle()) == 1
    await pools.close()


@pytest.mark.anyio
async def test_a_failed_prewarm_is_retried_by_upkeep(tmp_path: Path) -> None:
    pools, runtime = pools_on_fake(tmp_path, image_pools={"sidecar-test/later:1": {"min_idle": 1}})
    await pools.maintain_all()  # the image is missing and cannot be pulled: no pool yet
    assert pools.pools == []
    runtime.add_image("sidecar-test/later:1")
    await pools.maintain_all()
    (pool,) = pools.pools
    assert len(pool.idle()) == 1
    await pools.close()


@pytest.mark.anyio
async def test_refresh_moves_a_pool_to_the_image_its_tag_names_now(tmp_path: Path) -> None:
    pools, runtime = pools_on_fake(tmp_path, image_pools={IMAGE: {"min_idle": 1}})
    await pools.maintain_all()  # what start() does, without the background upkeep
    (old,) = pools.pools
    busy = await old.lease()
    runtime.images[IMAGE] = runtime.add_image("sidecar-test/newer:1")  # the tag moved
    before, now = await pools.refresh(IMAGE)
    assert before == [old.key.image_id] and now == runtime.images[IMAGE]
    await pools.maintain_all()
    (new,) = pools.pools
    assert new.key.image_id == now and len(new.idle()) == 1
    assert pools.retiring_pools == [old] and old.sidecars == [busy]  # still running
    await old.release(busy, reusable=True)
    await pools.maintain_all()
    assert pools.retiring_pools == []
    await pools.close()


@pytest.mark.anyio
async def test_reload_resizes_changed_pools_and_winds_down_removed_ones(tmp_path: Path) -> None:
    pools, _ = pools_on_fake(tmp_path, image_pools={IMAGE: {"min_idle": 1}})
    await pools.maintain_all()  # what start() does, without the background upkeep
    (pool,) = pools.pools
    reloaded = load_settings(
        data_dir=tmp_path,
        execution={"allowed_images": ["sidecar-test/*"], "image_pools": {IMAGE: {"min_idle": 2}}},
    ).execution
    assert await pools.apply_settings(reloaded) == [IMAGE]
    await pools.maintain_all()
    assert pools.pools == [pool] and len(pool.idle()) == 2  # resized in place
    limited = load_settings(
        data_dir=tmp_path,
        execution={
            "allowed_images": ["sidecar-test/*"],
            "image_pools": {IMAGE: {"min_idle": 2, "cpus": 0.5}},
        },
    ).execution
    await pools.apply_settings(limited)  # a limit keys the pool: a new one takes over
    await pools.maintain_all()
    (limited_pool,) = pools.pools
    assert limited_pool.key.cpus == 0.5 and len(limited_pool.idle()) == 2
    assert pool.sidecars == []
    removed = load_settings(
        data_dir=tmp_path, execution={"allowed_images": ["sidecar-test/*"]}
    ).execution
    await pools.apply_settings(removed)
    await pools.maintain_all()
    await pools.maintain_all()
    assert pools.pools == [] and pools.retiring_pools == []
    await pools.close()


@pytest.mark.anyio
async def test_a_reload_keeps_operator_changes_of_images_whose_entry_did_not_change(
    tmp_path: Path,
) -> None:
    pools, _ = pools_on_fake(tmp_path, image_pools={IMAGE: {"min_idle": 1}})
    await pools.scale(IMAGE, max_sidecars=2)
    same = load_settings(
        data_dir=tmp_path,
        execution={"allowed_images": ["sidecar-test/*"], "image_pools": {IMAGE: {"min_idle": 1}}},
    ).execution
    assert await pools.apply_settings(same) == []
    assert pools.settings_for(IMAGE).max_sidecars == 2
    changed = load_settings(
        data_dir=tmp_path,
        execution={"allowed_images": ["sidecar-test/*"], "image_pools": {IMAGE: {"min_idle": 3}}},
    ).execution
    await pools.apply_settings(changed)
    assert pools.settings_for(IMAGE).max_sidecars == 4  # the file's entry won
    await pools.close()


# ---------------------------------------------------------- pull policy


class PullCounter:
    def __init__(self) -> None:
        self.ids = {"a:1": "sha256:one", "a@sha256:" + "1" * 64: "sha256:pinned"}
        self.pulls: list[str] = []
        self.registry_down = False

    def local_image_id(self, reference: str) -> str | None:
        return self.ids.get(reference)

    def pull_image(self, reference: str) -> str:
        self.pulls.append(reference)
        if self.registry_down:
            raise ImageUnavailable("registry unreachable")
        return self.ids[reference]


@pytest.mark.anyio
async def test_pull_policy_always_repulls_tags_after_the_interval_never_digests() -> None:
    runtime, clock = PullCounter(), Clock()
    images = ImageResolver(runtime, anyio.CapacityLimiter(2), 5, clock=clock)
    assert await images.resolve("a:1", "if_not_present") == "sha256:one"
    assert runtime.pulls == []
    await images.resolve("a:1", "always", pull_interval_s=60)
    await images.resolve("a:1", "always", pull_interval_s=60)
    assert runtime.pulls == ["a:1"]  # once per interval
    runtime.ids["a:1"] = "sha256:two"  # the tag moved upstream
    clock.now += 61
    assert await images.resolve("a:1", "always", pull_interval_s=60) == "sha256:two"
    digest = "a@sha256:" + "1" * 64
    clock.now += 61
    await images.resolve(digest, "always", pull_interval_s=60)
    assert runtime.pulls == ["a:1", "a:1"]


@pytest.mark.anyio
async def test_a_failed_pull_of_a_present_tag_keeps_the_local_image() -> None:
    runtime = PullCounter()
    runtime.registry_down = True
    images = ImageResolver(runtime, anyio.CapacityLimiter(2), 5)
    assert await images.resolve("a:1", "always", pull_interval_s=60) == "sha256:one"
    assert await images.refresh("a:1") == "sha256:one"
    assert runtime.pulls == ["a:1", "a:1"]


# ------------------------------------------------------------- layering


def test_the_pool_layer_imports_nothing_from_execution_or_the_servers() -> None:
    root = Path(__file__).resolve().parents[2] / "worker" / "pool"
    for source in root.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("worker.execution", "worker.server")), (
                    f"{source.name} imports {node.module}"
                )
