"""Failure paths of one action, end to end, without Docker: the real ActionExecutor, SidecarRun,
SidecarPools and ExecWaiter, wired by ExecutionSide as the service wires them, on a
FakeContainerRuntime whose execs run the real runner as local processes.

Each test checks the ExecuteResponse (status code and message), what became of the sidecar
(reused, destroyed, replaced) and that no action directory is left behind.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.config import load_settings
from worker.digests import Digest
from worker.execution.wiring import DEFAULT_RUNNER, ExecutionSide
from worker.reapi import re_pb2
from worker.runner_contract import CONTROL, STDOUT
from worker.runtime.fake import FakeContainerRuntime
from worker.runtime.protocol import (
    ContainerGone,
    ContainerRuntimeError,
    RuntimeRejected,
    RuntimeUnavailable,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not DEFAULT_RUNNER.exists(), reason="run `make` to build the runner"),
]

IMAGE = "sidecar-test/fake:1"
OK = grpc.StatusCode.OK.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]


class Worker:
    """An ExecutionSide on a fake runtime, and a way to run shell actions through it."""

    def __init__(self, side: ExecutionSide, fake: FakeContainerRuntime, store: DiskBlobStore):
        self.side = side
        self.fake = fake
        self.store = store

    def _put(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.store.put(digest, data)
        return digest

    async def run(
        self,
        script: str,
        timeout_s: int = 0,
        cancelled: asyncio.Event | None = None,
        outputs: tuple[str, ...] = (),
    ) -> re_pb2.ExecuteResponse:
        command = re_pb2.Command(arguments=["/bin/sh", "-c", script], output_paths=outputs)
        action = re_pb2.Action(
            command_digest=self._put(command.SerializeToString()).to_proto(),
            input_root_digest=Digest.of(b"").to_proto(),  # the empty Directory
            timeout=duration_pb2.Duration(seconds=timeout_s) if timeout_s else None,
            platform=re_pb2.Platform(
                properties=[
                    re_pb2.Platform.Property(name="container-image", value=f"docker://{IMAGE}")
                ]
            ),
            # Each action is new: identical ones would share a result in the service above.
            salt=random.randbytes(8),
        )
        response, _ = await self.side.executor.execute(
            self._put(action.SerializeToString()),
            re_pb2.ExecutedActionMetadata(),
            cancelled or asyncio.Event(),
        )
        return response

    def stdout(self, response: re_pb2.ExecuteResponse) -> bytes:
        return self.store.read(Digest.from_proto(response.result.stdout_digest))

    @property
    def sidecar_ids(self) -> list[str]:
        return [s.container_id for pool in self.side.pools.pools for s in pool.sidecars]

    @property
    def containers(self) -> list[str]:
        return list(self.fake.containers)

    def sidecar_dirs(self) -> list[Path]:
        return sorted(self.side.exec_root.sidecars.iterdir())

    async def action_dirs_left(self) -> list[Path]:
        """Action directories still in sidecar directories or in the trash, once background
        removals are done."""
        await self.side.executor.close()  # waits for them; the executor stays usable
        inside = [a for s in self.sidecar_dirs() for a in s.iterdir()]
        return inside + list(self.side.exec_root.trash.iterdir())

    async def running_action_dir(self) -> Path:
        """The directory of the one action running now, once it has written to stdout."""
        for _ in range(500):
            for stdout in self.side.exec_root.sidecars.glob(f"*/*/{CONTROL}/{STDOUT}"):
                if stdout.stat().st_size:
                    return stdout.parent.parent
            await asyncio.sleep(0.01)
        raise AssertionError("no action started")


@pytest.fixture
def base_dir(reachable_dir: Path) -> Path:
    return reachable_dir


@asynccontextmanager
async def worker(
    base: Path, fake: FakeContainerRuntime | None = None, daemon_wait_s: float = 0
) -> AsyncIterator[Worker]:
    if fake is None:
        fake = FakeContainerRuntime()
        fake.add_image(IMAGE)
    settings = load_settings(
        data_dir=base / "data",
        server={"listen": "127.0.0.1:0", "worker_name": "faults"},
        execution={
            "allowed_images": [IMAGE],
            "default_timeout_s": 30,
            "max_timeout_s": 60,
            "pull_timeout_s": 10,
            "daemon_wait_s": daemon_wait_s,
            # The fake runtime models `docker exec` of the runner; the agent runs only in
            # real sidecars (tests/integration/test_agent_dispatch.py).
            "pool": {"max_sidecars": 2, "dispatch": "exec"},
        },
    )
    store = DiskBlobStore(settings.data_dir / "cas", 1 << 30)
    side = ExecutionSide(
        settings=settings,
        worker_name="faults",
        worker_id="0" * 32,
        store=store,
        action_cache=DiskActionCache(settings.data_dir / "action-cache", store),
        runtime=fake,
    )
    await side.start(daemon_wait_s=1)
    try:
        yield Worker(side, fake, store)
    finally:
        await side.close()
        store.close()  # its journal thread is done before reachable_dir is removed
        assert fake.containers == {}, "the worker left containers behind"


def running_with(marker: str) -> bool:
    """Whether a live process of this host has `marker` in its argv."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                if (entry / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
                    return True
        except OSError:
            continue
    return False


def long_sleep() -> str:
    """A sleep no other process runs, to look for afterwards."""
    return f"sleep {30 + random.random():.6f}"


# ------------------------------------------------------------------ success


async def test_an_action_succeeds_and_its_sidecar_is_reused(base_dir: Path) -> None:
    async with worker(base_dir) as w:
        first = await w.run("echo hi; echo data > out", outputs=("out",))
        second = await w.run("echo again")
        assert (first.status.code, first.result.exit_code) == (OK, 0)
        assert w.stdout(first) == b"hi\n" and w.stdout(second) == b"again\n"
        assert [f.path for f in first.result.output_files] == ["out"]
        assert w.fake.calls["create_sidecar"] == 1 and w.fake.calls["start_exec"] == 2
        assert len(w.containers) == 1 and w.sidecar_ids == w.containers
        # The worker asked the runner for a scrub and for exclusive clean-up (the fake ran it
        # without them, on this host); the runner's report made the sidecar reusable.
        assert {argv[7] for argv in w.fake.started} == {"scrub,exclusive"}
        assert await w.action_dirs_left() == []


async def test_a_non_zero_exit_is_an_ok_result_in_a_reused_sidecar(base_dir: Path) -> None:
    async with worker(base_dir) as w:
        response = await w.run("echo out; exit 3")
        assert (response.status.code, response.result.exit_code) == (OK, 3)
        await w.run("true")
        assert w.fake.calls["create_sidecar"] == 1


# ------------------------------------------------------- exec fails to start


@pytest.mark.parametrize("fault", ["vanished", "stopped", "injected"])
async def test_exec_that_cannot_start_is_retried_once_in_a_new_sidecar(
    base_dir: Path, fault: str
) -> None:
    """The warm sidecar is gone (404) or stopped (409) when the exec starts: the action runs
    in a fresh sidecar instead, and the broken one is removed with its directory."""
    async with worker(base_dir) as w:
        await w.run("true")
        (broken,) = w.containers
        broken_dir = w.sidecar_dirs()[0]
        if fault == "vanished":
            w.fake.vanish(broken)
        elif fault == "stopped":
            w.fake.stop(broken)
        else:
            w.fake.fail_next("start_exec", ContainerGone("No such container"))
        response = await w.run("echo retried")
        assert (response.status.code, w.stdout(response)) == (OK, b"retried\n")
        assert w.fake.calls["create_sidecar"] == 2
        assert broken not in w.containers and len(w.containers) == 1
        assert broken_dir not in w.sidecar_dirs() and len(w.sidecar_dirs()) == 1
        await w.run("true")
        assert w.fake.calls["create_sidecar"] == 2  # the replacement is reused
        assert await w.action_dirs_left() == []


async def test_exec_that_fails_to_start_twice_is_unavailable(base_dir: Path) -> None:
    async with worker(base_dir) as w:
        w.fake.fail_next("start_exec", ContainerGone("No such container"), times=2)
        response = await w.run("true")
        assert response.status.code == UNAVAILABLE
        assert f"sidecars of {IMAGE} keep failing" in response.status.message
        assert w.fake.calls["create_sidecar"] == 2
        assert w.containers == [] and w.sidecar_dirs() == []
        assert (await w.run("true")).status.code == OK  # the next action is fine
        assert await w.action_dirs_left() == []


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (RuntimeUnavailable("connection refused"), UNAVAILABLE, "Docker daemon"),
        (RuntimeRejected("bad request"), FAILED_PRECONDITION, "the Docker daemon refused"),
    ],
)
async def test_exec_refused_by_the_daemon_is_not_retried(
    base_dir: Path, error: ContainerRuntimeError, code: int, message: str
) -> None:
    async with worker(base_dir) as w:
        w.fake.fail_next("start_exec", error)
        response = await w.run("true")
        assert response.status.code == code and message in response.status.message
        assert w.fake.calls["create_sidecar"] == 1 and w.fake.calls["start_exec"] == 1
        assert w.containers == [] and w.sidecar_dirs() == []  # not trusted again
        assert await w.action_dirs_left() == []


# -------------------------------------------------------------- mid-action


async def test_sidecar_that_vanishes_mid_action_gives_a_clear_status_and_is_replaced(
    base_dir: Path,
) -> None:
    async with worker(base_dir) as w:
        sleep = long_sleep()
        running = asyncio.ensure_future(w.run(f"echo started; {sleep}; echo never"))
        await w.running_action_dir()
        assert running_with(sleep)
        (vanishing,) = w.containers
        w.fake.vanish(vanishing)
        response = await asyncio.wait_for(running, 10)
        assert response.status.code == INTERNAL
        assert "the sidecar failed while running the action (lost" in response.status.message
        assert "the sidecar was replaced" in response.status.message
        assert w.stdout(response) == b"started\n"  # what it wrote before is kept
        assert not running_with(sleep)
        assert w.containers == [] and w.sidecar_dirs() == []
        assert (await w.run("true")).status.code == OK
        assert w.fake.calls["create_sidecar"] == 2
        assert await w.action_dirs_left() == []


async def test_sidecar_that_vanishes_while_the_event_stream_is_down_is_not_run_twice(
    base_dir: Path,
) -> None:
    """The same fault as above, noticed by polling instead of by an event: the same outcome,
    and the action is not started a second time."""
    async with worker(base_dir) as w:
        w.fake.fail_next("wait_exec_events", RuntimeUnavailable("daemon restarting"), times=1000)
        w.fake.end_event_streams()
        running = asyncio.ensure_future(w.run(f"echo started; {long_sleep()}"))
        try:
            await w.running_action_dir()
            (vanishing,) = w.containers
            w.fake.vanish(vanishing)
            for _ in range(500):  # the poll comes within a second
                if running.done() or w.fake.calls["start_exec"] > 1:
                    break
                await asyncio.sleep(0.01)
            assert w.fake.calls["start_exec"] == 1, "the action was started again"
            response = await asyncio.wait_for(running, 10)
            assert response.status.code == INTERNAL
            assert "the sidecar was replaced" in response.status.message
        finally:
            running.cancel()


async def test_timeout_is_deadline_exceeded_with_exit_code_137(base_dir: Path) -> None:
    async with worker(base_dir) as w:
        sleep = long_sleep()
        response = await w.run(f"echo started; {sleep}; echo never", timeout_s=1)
        assert response.status.code == DEADLINE_EXCEEDED
        assert "timed out after 1 s" in response.status.message
        assert response.result.exit_code == 137
        assert w.stdout(response) == b"started\n"
        assert not running_with(sleep)
        assert w.containers == [] and w.sidecar_dirs() == []  # never reused after a timeout
        assert (await w.run("true")).status.code == OK
        assert w.fake.calls["create_sidecar"] == 2
        assert await w.action_dirs_left() == []


async def test_cancel_mid_action_kills_it_and_replaces_the_sidecar(base_dir: Path) -> None:
    async with worker(base_dir) as w:
        sleep = long_sleep()
        cancelled = asyncio.Event()
        running = asyncio.ensure_future(w.run(f"echo started; {sleep}", cancelled=cancelled))
        await w.running_action_dir()
        cancelled.set()
        response = await asyncio.wait_for(running, 10)
        assert response.status.code == CANCELLED
        assert response.result.exit_code == 137
        assert not running_with(sleep)
        assert [argv[1] for argv in w.fake.started] == ["run", "cancel"]
        assert w.containers == [] and w.sidecar_dirs() == []
        assert await w.action_dirs_left() == []


async def test_lost_event_stream_is_covered_by_polling(base_dir: Path) -> None:
    """The daemon's event stream breaks and cannot be reopened for a while: the action's end
    is still noticed, by inspecting the exec."""
    async with worker(base_dir) as w:
        w.fake.fail_next("wait_exec_events", RuntimeUnavailable("daemon restarting"), times=1000)
        w.fake.end_event_streams()
        response = await asyncio.wait_for(w.run("echo hi"), 10)
        assert (response.status.code, w.stdout(response)) == (OK, b"hi\n")
        assert w.fake.calls["exec_exit_code"] >= 1
        assert w.fake.calls["create_sidecar"] == 1  # nothing was wrong with the sidecar


# ------------------------------------------------------ sidecar creation


@pytest.mark.parametrize("hang_s", [0.0, 0.3])
async def test_daemon_unavailable_or_timing_out_on_create_is_unavailable(
    base_dir: Path, hang_s: float
) -> None:
    async with worker(base_dir) as w:
        if hang_s:
            w.fake.hang("create_sidecar", hang_s)
        w.fake.fail_next("create_sidecar", RuntimeUnavailable("Read timed out"))
        response = await w.run("true")
        assert response.status.code == UNAVAILABLE
        assert "cannot create a sidecar" in response.status.message
        assert w.fake.calls["create_sidecar"] == 1  # not retried here; the client retries
        assert w.containers == [] and w.sidecar_dirs() == []
        assert all(pool.sidecars == [] for pool in w.side.pools.pools)
        assert (await w.run("true")).status.code == OK


async def test_create_rejected_by_the_daemon_is_failed_precondition(base_dir: Path) -> None:
    async with worker(base_dir) as w:
        w.fake.fail_next("create_sidecar", RuntimeRejected("invalid mount config"))
        response = await w.run("true")
        assert response.status.code == FAILED_PRECONDITION
        assert f"cannot create a sidecar of {IMAGE}" in response.status.message
        assert "invalid mount config" in response.status.message
        assert w.fake.calls["create_sidecar"] == 1
        assert w.containers == [] and w.sidecar_dirs() == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ContainerGone(f"No such image: {IMAGE}"), FAILED_PRECONDITION),
        (RuntimeUnavailable("daemon restarting"), UNAVAILABLE),
    ],
)
async def test_create_failing_after_a_successful_pull(
    base_dir: Path, error: ContainerRuntimeError, code: int
) -> None:
    fake = FakeContainerRuntime()
    fake.allow_pull(IMAGE)
    async with worker(base_dir, fake) as w:
        fake.fail_next("create_sidecar", error)
        response = await w.run("true")
        assert response.status.code == code
        assert "cannot create a sidecar" in response.status.message
        assert fake.calls["pull_image"] == 1 and fake.local_image_id(IMAGE) is not None
        assert w.containers == [] and w.sidecar_dirs() == []
        assert (await w.run("true")).status.code == OK
        assert fake.calls["pull_image"] == 1  # the pulled image serves the next action


async def test_image_that_cannot_be_pulled_is_failed_precondition(base_dir: Path) -> None:
    async with worker(base_dir, FakeContainerRuntime()) as w:
        response = await w.run("true")
        assert response.status.code == FAILED_PRECONDITION
        assert f"image {IMAGE!r} could not be pulled" in response.status.message
        assert w.fake.calls["create_sidecar"] == 0 and w.sidecar_dirs() == []


async def test_an_action_waits_for_a_daemon_that_is_away_and_then_runs(base_dir: Path) -> None:
    """A daemon restarting (unreachable for a moment) does not fail actions that had not
    started: they try again for up to execution.daemon_wait_s."""
    async with worker(base_dir, daemon_wait_s=10) as w:
        w.fake.fail_next("create_sidecar", RuntimeUnavailable("daemon restarting"), times=2)
        response = await w.run("echo waited")
        assert response.status.code == OK, response.status
        assert w.stdout(response) == b"waited\n"
        assert w.fake.calls["create_sidecar"] == 3


async def test_action_and_command_are_read_off_the_event_loop(base_dir: Path) -> None:
    """Reading the Action and Command blobs is disk I/O: it must not block the event loop that
    serves every other RPC."""
    async with worker(base_dir) as w:
        loop_thread = threading.get_ident()
        read_in: list[int] = []
        original = w.store.read

        def recording_read(digest: Digest) -> bytes:
            read_in.append(threading.get_ident())
            return original(digest)

        w.store.read = recording_read  # type: ignore[method-assign]
        response = await w.run("true")
        assert response.status.code == OK
        assert read_in, "the store was never read"
        assert loop_thread not in read_in
