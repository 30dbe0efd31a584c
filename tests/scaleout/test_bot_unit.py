"""Fast checks of the bot without Docker or BuildGrid: argument parsing, the offer, and the session
loop against a scripted Bots server on loopback (real gRPC, fake scheduler and fake actions).
The real scheduler and executor are covered by the other tests in this directory."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import pytest

from tests.scaleout.services import free_port
from worker.bots.leases import retryable
from worker.bots.offer import build_offer, extra_property_keys
from worker.bots.rwapi import bots_grpc, bots_pb2
from worker.bots.scheduler import parse_scheduler
from worker.bots.session import BotLoop
from worker.cli import _parser
from worker.commands.common import ConfigError
from worker.commands.worker import settings_for
from worker.config import BotSettings, load_settings
from worker.errors import Cancelled
from worker.execution.platform import HOST_ISA
from worker.reapi import re_pb2, status_pb2

LeaseState = bots_pb2.LeaseState


def test_scheduler_urls() -> None:
    assert str(parse_scheduler("grpc://127.0.0.1:8980")) == "grpc://127.0.0.1:8980"
    secure = parse_scheduler("grpcs://buildgrid.example:443/")
    assert secure.tls and secure.target == "buildgrid.example:443"
    for bad in ("127.0.0.1:8980", "http://h:1", "grpc://h", "grpc://h:0", "grpc://:80"):
        with pytest.raises(ValueError):
            parse_scheduler(bad)


def _args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    return _parser().parse_args(["worker", "--data-dir", str(tmp_path), *argv])


def test_the_offer_lists_platform_images_and_extra_properties(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(
        "execution:\n  max_concurrent_actions: 3\n"
        "  image_pools: {'docker://img-b:2': {}, 'img-a:1': {min_idle: 1}}\n"
        "bot: {properties: ['pool=fast']}\n"
    )
    args = _args(
        tmp_path,
        "--scheduler",
        "grpc://127.0.0.1:1",
        "--instance",
        "main",
        "--config",
        str(config),
        "--property",
        "disk=ssd",
        "--property",
        "pool=fast",
    )
    settings, scheduler = settings_for(args)
    assert str(scheduler) == "grpc://127.0.0.1:1"
    assert settings.bot.instance == "main"
    offer = build_offer(settings, "host")
    assert offer.properties == (
        ("OSFamily", "linux"),
        ("ISA", HOST_ISA),
        ("container-image", "docker://img-a:1"),
        ("container-image", "docker://img-b:2"),
        ("pool", "fast"),
        ("disk", "ssd"),
    )
    assert offer.capacity == 3
    worker = offer.to_worker()
    assert [(p.key, p.value) for p in worker.devices[0].properties] == list(offer.properties)
    assert [(c.key, c.value) for c in worker.configs] == [("capacity", "3")]
    # Actions may carry the extra keys: the executor is told to accept them.
    assert extra_property_keys(settings) == ["disk", "pool"]
    assert {"disk", "pool"} <= set(settings.execution.ignored_properties)


def test_bad_worker_arguments_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --scheduler"):
        settings_for(_args(tmp_path))
    with pytest.raises(ConfigError, match="grpc:// or grpcs://"):
        settings_for(_args(tmp_path, "--scheduler", "http://h:1"))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        settings_for(_args(tmp_path, "--scheduler", "grpc://h:1", "--property", "novalue"))
    cache_only = tmp_path / "cache-only.yml"
    cache_only.write_text("execution: {enabled: false}\n")
    with pytest.raises(ConfigError, match="execution.enabled"):
        settings_for(_args(tmp_path, "--scheduler", "grpc://h:1", "--config", str(cache_only)))


def test_worker_faults_become_unavailable_so_the_scheduler_requeues() -> None:
    internal = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message="sidecar lost")
    assert retryable(internal).code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert retryable(internal).message == "sidecar lost"
    timeout = status_pb2.Status(code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert retryable(timeout) == timeout


# ---------------------------------------------------------------- the session loop


def _lease(lease_id: str) -> bots_pb2.Lease:
    lease = bots_pb2.Lease(id=lease_id, state=LeaseState.ACTIVE)
    lease.payload.Pack(re_pb2.Action())
    return lease


class ScriptedBots(bots_grpc.BotsServicer):
    """Hands out lease "i/one" at creation and "i/two" once "i/one" is reported; drops
    "i/two" (a cancel, as BuildGrid does it) once the bot has reported it ACTIVE twice."""

    def __init__(self) -> None:
        self.updates: list[bots_pb2.UpdateBotSessionRequest] = []
        self.creates = 0
        self.version = 1
        self.two_seen = 0

    async def CreateBotSession(
        self, request: bots_pb2.CreateBotSessionRequest, context: object
    ) -> bots_pb2.BotSession:
        self.creates += 1
        session = bots_pb2.BotSession()
        session.CopyFrom(request.bot_session)
        session.name = "farm/session-1"
        session.version = str(self.version)
        session.leases.append(_lease("i/one"))
        session.expire_time.GetCurrentTime()
        session.expire_time.seconds += 30
        return session

    async def UpdateBotSession(
        self, request: bots_pb2.UpdateBotSessionRequest, context: object
    ) -> bots_pb2.BotSession:
        self.updates.append(request)
        session = bots_pb2.BotSession()
        session.CopyFrom(request.bot_session)
        del session.leases[:]
        states = {lease.id: lease.state for lease in request.bot_session.leases}
        if states.get("i/one") == LeaseState.ACTIVE:
            session.leases.append(_lease("i/one"))
        if states.get("i/one") == LeaseState.COMPLETED:
            self.version += 1
            session.leases.append(_lease("i/two"))
        if states.get("i/two") == LeaseState.ACTIVE:
            self.two_seen += 1
            if self.two_seen < 2:
                session.leases.append(_lease("i/two"))
        session.version = str(self.version)
        session.expire_time.GetCurrentTime()
        session.expire_time.seconds += 30
        return session


class FakeRunner:
    """ "i/one" succeeds at once; any other lease runs until cancelled."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.saw_cancel = asyncio.Event()

    async def run(
        self,
        lease: bots_pb2.Lease,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
    ) -> bots_pb2.Lease:
        if lease.id != "i/one":
            await cancelled.wait()
            self.cancelled.append(lease.id)
            self.saw_cancel.set()
            raise Cancelled("taken back")
        metadata.worker = "fake"
        done = bots_pb2.Lease(id=lease.id, state=LeaseState.COMPLETED)
        done.result.Pack(re_pb2.ActionResult(exit_code=0, execution_metadata=metadata))
        return done


async def _serve(servicer: ScriptedBots, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    bots_grpc.add_BotsServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def _loop(port: int, runner: FakeRunner, tmp_path: Path) -> tuple[BotLoop, grpc.aio.Channel]:
    settings = load_settings(data_dir=tmp_path, execution={"max_concurrent_actions": 1})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    bot = BotLoop(
        channel,
        "bot-1",
        build_offer(settings, "host"),
        runner,
        BotSettings(keepalive_s=0.2, retry_max_s=0.5),
        grace_s=1,
        status_file=tmp_path / "status.json",
    )
    return bot, channel


def test_the_loop_echoes_versions_reports_at_once_and_cancels_dropped_leases(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[ScriptedBots, FakeRunner, BotLoop]:
        port = free_port()
        servicer = ScriptedBots()
        server = await _serve(servicer, port)
        runner = FakeRunner()
        bot, channel = _loop(port, runner, tmp_path)
        task = asyncio.create_task(bot.run())
        await asyncio.wait_for(runner.saw_cancel.wait(), 30)
        bot.stop()
        await asyncio.wait_for(task, 30)
        await channel.close(None)
        await server.stop(None)
        return servicer, runner, bot

    servicer, runner, bot = asyncio.run(scenario())
    # An update may already be on its way when lease one finishes: it is interrupted and the
    # result goes at once in the next one, but the scheduler may have seen the first (on a
    # loaded machine it did). The report is the first update that carries the result; any
    # before it only said the lease was running.
    reports = [
        i
        for i, update in enumerate(servicer.updates)
        if ("i/one", LeaseState.COMPLETED)
        in [(lease.id, lease.state) for lease in update.bot_session.leases]
    ]
    start = reports[0]
    for early in servicer.updates[:start]:
        assert [(lease.id, lease.state) for lease in early.bot_session.leases] == [
            ("i/one", LeaseState.ACTIVE)
        ]
    first = servicer.updates[start]
    assert first.name == "farm/session-1"
    assert first.bot_session.version == "1"  # echoed from CreateBotSession
    (reported,) = first.bot_session.leases
    assert reported.id == "i/one" and reported.state == LeaseState.COMPLETED
    result = re_pb2.ActionResult()
    assert reported.result.Unpack(result)
    assert result.execution_metadata.worker == "fake"
    # After the report came version 2 and lease two, reported ACTIVE with that version.
    second = servicer.updates[start + 1]
    assert second.bot_session.version == "2"
    assert [(lease.id, lease.state) for lease in second.bot_session.leases] == [
        ("i/two", LeaseState.ACTIVE)
    ]
    # Lease two, dropped by the scheduler, was cancelled and never reported as finished.
    assert runner.cancelled == ["i/two"]
    later = [
        lease.id for update in servicer.updates[start + 3 :] for lease in update.bot_session.leases
    ]
    assert "i/two" not in later
    assert servicer.updates[-1].bot_session.status == bots_pb2.BotStatus.BOT_TERMINATING
    assert first.bot_session.status == bots_pb2.BotStatus.OK
    assert bot.status("x")["leases_completed"] == 1


def test_the_loop_waits_for_an_absent_scheduler_and_joins_when_it_comes(tmp_path: Path) -> None:
    async def scenario() -> ScriptedBots:
        port = free_port()
        runner = FakeRunner()
        bot, channel = _loop(port, runner, tmp_path)
        task = asyncio.create_task(bot.run())
        await asyncio.sleep(2)  # several refused attempts
        assert not task.done()
        servicer = ScriptedBots()
        server = await _serve(servicer, port)
        for _ in range(600):
            if servicer.updates:
                break
            await asyncio.sleep(0.05)
        bot.stop()
        await asyncio.wait_for(task, 30)
        await channel.close(None)
        await server.stop(None)
        return servicer

    servicer = asyncio.run(scenario())
    assert servicer.creates == 1
    assert servicer.updates
