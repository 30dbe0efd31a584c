"""The operator's side of a real running service against the real daemon: the Prometheus
endpoint after real actions, the admin CLI (pools and operations), a tag that moves, autoscaling
with real sidecars, and a configuration reload on SIGHUP."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.execution_client import (
    execute,
    response_of,
    run,
    shell_action,
    stage_of,
    start_execute,
    stdout_of,
    upload_action,
)
from tests.images import IMAGE_A, IMAGE_B
from tests.integration.test_fault_matrix import containers_of, service_process
from tests.serving import RunningService, running_service
from worker.config import Settings, load_settings
from worker.digests import Digest
from worker.execution.operations import Stage
from worker.reapi import re_grpc, re_pb2

pytestmark = pytest.mark.docker

A = {"container-image": f"docker://{IMAGE_A}"}


def ops_settings(tmp_path: Path, **pool: object) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        server={"listen": "127.0.0.1:0", "worker_name": f"ops-{tmp_path.name}"},
        metrics={"listen": "127.0.0.1:0"},
        admin={"listen": f"unix:{tmp_path / 'admin.sock'}"},
        execution={
            "max_concurrent_actions": 4,
            "default_timeout_s": 60,
            "daemon_wait_s": 2,
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": 2, **pool},
        },
    )


@pytest.fixture
def ops(tmp_path: Path, test_images: None) -> Iterator[RunningService]:
    with running_service(ops_settings(tmp_path)) as running:
        yield running


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def admin_cli(running: RunningService, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, "--admin", running.service.settings.admin_address)


def pools_json(running: RunningService) -> list[dict[str, Any]]:
    listed = admin_cli(running, "pools", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    pools: list[dict[str, Any]] = json.loads(listed.stdout)["pools"]
    return pools


def eventually(check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def scrape(running: RunningService) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    endpoint = running.service.metrics_endpoint
    assert endpoint is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in metrics.items() if n == name and wanted <= ls]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def sh(script: str, **fields: object) -> Any:
    return shell_action(script, IMAGE_A, **fields)


# --------------------------------------------------------------- metrics


def test_metrics_endpoint_reports_what_real_actions_did(ops: RunningService) -> None:
    channel = ops.channel
    first = run(channel, sh("echo one"))
    assert first.status.code == 0
    assert run(channel, sh("echo two")).status.code == 0
    assert run(channel, sh("exit 3")).result.exit_code == 3
    again = execute(channel, upload_action(channel, sh("echo one")), skip_cache_lookup=False)
    assert again.response.cached_result
    with pytest.raises(grpc.RpcError) as missing:
        re_grpc.ActionCacheStub(channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=Digest.of(b"never").to_proto())
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    pool = {"image": IMAGE_A, "user": "65534:65534", "network": "none"}
    before = scrape(ops)  # pool gauges exist while the pool does
    assert value(before, "sidecar_executor_pool_max_sidecars", **pool) == 2
    assert value(before, "sidecar_executor_pool_sidecars", state="idle", **pool) == 1
    assert value(before, "sidecar_executor_pool_sidecars", state="busy", **pool) == 0
    assert value(before, "sidecar_executor_pool_waiting_leases", **pool) == 0
    execution = ops.service.execution
    assert execution is not None
    ops.call(execution.pools.recycle(IMAGE_A))

    metrics = scrape(ops)
    assert value(metrics, "sidecar_executor_actions_total", outcome="success", status="OK") == 2
    assert value(metrics, "sidecar_executor_actions_total", outcome="exit_nonzero") == 1
    assert value(metrics, "sidecar_executor_actions_total", outcome="cached") == 1
    assert value(metrics, "sidecar_executor_pool_leases_total", **pool) == 3
    assert value(metrics, "sidecar_executor_pool_cold_starts_total", **pool) == 1
    assert value(metrics, "sidecar_executor_pool_lease_wait_seconds_count", **pool) == 3
    assert value(metrics, "sidecar_executor_pool_run_seconds_count", **pool) == 3
    assert value(metrics, "sidecar_executor_pool_run_seconds_sum", **pool) > 0
    assert value(metrics, "sidecar_executor_pool_recycles_total", reason="operator", **pool) == 1
    execute_method = "/build.bazel.remote.execution.v2.Execution/Execute"
    assert value(metrics, "sidecar_executor_grpc_requests_total", method=execute_method) == 4
    get_result = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult"
    assert (
        value(metrics, "sidecar_executor_grpc_requests_total", method=get_result, code="NOT_FOUND")
        == 1
    )
    assert value(metrics, "sidecar_executor_execution_queue_depth") == 0
    store = ops.service.storage.blobs
    assert value(metrics, "sidecar_executor_cas_blobs") == store.blob_count > 0
    assert value(metrics, "sidecar_executor_cas_bytes") == store.total_bytes > 0
    assert value(metrics, "sidecar_executor_cas_upload_bytes_total") >= store.total_bytes
    assert value(metrics, "sidecar_executor_cas_download_bytes_total") > 0
    lookups = value(metrics, "sidecar_executor_cas_lookups_total")
    hits = value(metrics, "sidecar_executor_cas_lookup_hits_total")
    assert lookups > 0 and value(metrics, "sidecar_executor_cas_hit_ratio") == hits / lookups
    # The recycled sidecar is gone from the daemon too.
    eventually(lambda: containers_of(ops.service.identity.worker_id) == [])


# ------------------------------------------------------------- admin CLI


def test_cli_scales_recycles_drains_a_pool_of_the_running_service(ops: RunningService) -> None:
    worker = ops.service.identity.worker_id
    assert run(ops.channel, sh("true")).status.code == 0
    scaled = admin_cli(ops, "pools", "scale", f"docker://{IMAGE_A}", "--min-idle", "2")
    assert scaled.returncode == 0, scaled.stderr
    eventually(lambda: len(containers_of(worker)) == 2)
    (pool,) = pools_json(ops)
    assert (pool["image"], pool["idle"], pool["min_idle"], pool["served"]) == (IMAGE_A, 2, 2, 1)
    table = admin_cli(ops, "pools", "list").stdout
    assert IMAGE_A in table and "2/0/2" in table

    before = set(containers_of(worker))
    recycled = admin_cli(ops, "pools", "recycle", IMAGE_A)
    assert recycled.returncode == 0 and "recycling 2 sidecar(s)" in recycled.stdout
    eventually(lambda: len(set(containers_of(worker)) - before) == 2)
    eventually(lambda: not before & set(containers_of(worker)))

    drained = admin_cli(ops, "pools", "drain", IMAGE_A)
    assert drained.returncode == 0, drained.stderr
    refused = run(ops.channel, sh("echo late"))
    assert refused.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "drained by an operator" in refused.status.message
    eventually(lambda: containers_of(worker) == [])
    assert pools_json(ops)[0]["drained"] is True
    assert admin_cli(ops, "pools", "scale", IMAGE_A, "--min-idle", "0").returncode == 0
    assert stdout_of(ops.channel, run(ops.channel, sh("echo back"))) == b"back\n"


def test_cli_refuses_bad_arguments_with_a_clear_message(ops: RunningService) -> None:
    for args, message in (
        (("pools", "scale", IMAGE_A, "--min-idle", "3", "--max", "2"), "above --max"),
        (("pools", "scale", IMAGE_A, "--min-idle", "3"), "min_idle 3 is above max_sidecars 2"),
        (("pools", "scale", IMAGE_A, "--max", "-1"), "negative"),
        (("pools", "scale", IMAGE_A, "--idle-ttl", "soon"), "not a number of seconds"),
        (("pools", "drain", "sidecar-test/unknown:1"), "no pool of image"),
        (("pools", "refresh", "sidecar-test/unknown:1"), "no pool of image"),
        (("pools", "scale", "elsewhere/image:1", "--min-idle", "1"), "allowed_images"),
        (("operations", "cancel", "operations/not-a-real-one"), "no operation named"),
    ):
        result = admin_cli(ops, *args)
        assert result.returncode == 2, (args, result)
        assert message in result.stderr, (args, result.stderr)
    nowhere = cli("pools", "list", "--data-dir", str(Path(ops.service.settings.data_dir) / "no"))
    assert nowhere.returncode == 1 and "no admin socket" in nowhere.stderr


def test_the_admin_interface_is_not_on_the_reapi_port(ops: RunningService) -> None:
    result = cli("pools", "list", "--admin", ops.address)
    assert result.returncode != 0 and "UNIMPLEMENTED" in result.stderr
    socket = Path(ops.service.settings.admin_address.removeprefix("unix:"))
    assert socket.stat().st_mode & 0o777 == 0o600


def test_cli_lists_and_cancels_operations(ops: RunningService) -> None:
    stream = start_execute(ops.channel, upload_action(ops.channel, sh("sleep 60")))
    updates = iter(stream)
    first = next(updates)
    while stage_of(first) != Stage.EXECUTING:
        first = next(updates)
    listed = admin_cli(ops, "operations", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (operation,) = json.loads(listed.stdout)["operations"]
    assert (operation["name"], operation["stage"]) == (first.name, "EXECUTING")
    cancelled = admin_cli(ops, "operations", "cancel", first.name)
    assert cancelled.returncode == 0, cancelled.stderr
    final = list(updates)[-1]
    assert response_of(final).status.code == grpc.StatusCode.CANCELLED.value[0]


# ------------------------------------------------------------ image tags


@pytest.fixture
def moving_tag(test_images: None) -> Iterator[str]:
    """A tag of our own that the test moves between the two test images."""
    tag = f"sidecar-test/moving-{uuid.uuid4().hex[:8]}:1"
    client = docker.from_env()
    try:
        client.images.get(IMAGE_A).tag(tag)
        yield tag
    finally:
        client.images.remove(tag, noprune=True)  # the tag only: the images stay
        client.close()


def test_refresh_moves_a_pool_to_the_moved_tag_with_no_failed_action(
    tmp_path: Path, moving_tag: str
) -> None:
    settings = ops_settings(tmp_path)
    settings.execution.image_pools[moving_tag] = settings.execution.pool.model_copy(
        update={"min_idle": 1}
    )
    platform = {"container-image": f"docker://{moving_tag}"}
    with running_service(settings) as running:
        eventually(lambda: len(pools_json(running)) == 1 and pools_json(running)[0]["idle"] == 1)
        old_id = pools_json(running)[0]["image_id"]
        results: list[re_pb2.ExecuteResponse] = []
        slow = threading.Thread(
            target=lambda: results.append(
                run(running.channel, sh("sleep 2; cat /etc/image-name", action_platform=platform))
            )
        )
        slow.start()
        eventually(lambda: pools_json(running)[0]["busy"] == 1)
        docker.from_env().images.get(IMAGE_B).tag(moving_tag)  # the tag moves
        refreshed = admin_cli(running, "pools", "refresh", moving_tag)
        assert refreshed.returncode == 0, refreshed.stderr
        new_id = docker.from_env().images.get(IMAGE_B).id
        assert refreshed.stdout.strip().endswith(new_id)
        slow.join()
        (finished,) = results
        assert finished.status.code == 0  # the action under way finished on the old image
        assert stdout_of(running.channel, finished) == b"image-a\n"
        after = run(running.channel, sh("cat /etc/image-name", action_platform=platform))
        assert stdout_of(running.channel, after) == b"image-b\n"
        eventually(lambda: {p["image_id"] for p in pools_json(running)} == {new_id})
        assert old_id != new_id


# ------------------------------------------------------------ autoscaling


def test_pool_grows_when_leases_wait_and_shrinks_after_idle_ttl(
    tmp_path: Path, test_images: None
) -> None:
    """Two actions arrive at once at an empty pool: both wait for a cold start (longer than
    scale_up_wait_s), so the pool keeps more sidecars warm, up to max_sidecars and never
    above; idle_ttl_s later it is back at min_idle (0)."""
    settings = ops_settings(tmp_path, max_sidecars=3, scale_up_wait_s=0.01, idle_ttl_s=1)
    with running_service(settings) as running:
        worker = running.service.identity.worker_id
        seen: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                seen.append(len(containers_of(worker)))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            actions = [
                threading.Thread(target=run, args=(running.channel, sh(f"sleep 1; echo {n}")))
                for n in range(2)
            ]
            for action in actions:
                action.start()
            for action in actions:
                action.join()
            eventually(lambda: max(seen, default=0) == 3)  # grown ahead of demand
            metrics = scrape(running)
            assert value(metrics, "sidecar_executor_pool_prewarms_total", image=IMAGE_A) >= 1
            eventually(lambda: len(containers_of(worker)) == 0)  # shrunk after the TTL
        finally:
            stop.set()
            sampler.join()
        assert max(seen) == 3  # never above max_sidecars
        # Every sidecar went for its idle TTL (a pre-warm replaced once while the actions
        # still ran is possible, so at least the three seen).
        shrunk = value(scrape(running), "sidecar_executor_pool_recycles_total", reason="idle_ttl")
        assert shrunk >= 3
        execution = running.service.execution
        assert execution is not None
        assert all(pool.boost == 0 for pool in execution.pools.pools)


# ----------------------------------------------------------------- reload


def test_sighup_reloads_pool_settings_and_an_invalid_file_is_rejected(
    tmp_path: Path, test_images: None
) -> None:
    data_dir = tmp_path / "data"
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "server": {"listen": "127.0.0.1:0", "worker_name": "reload"},
        "admin": {"reload_interval_s": 0},  # SIGHUP only
        "execution": {
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": 3},
            "image_pools": {IMAGE_A: {"min_idle": 1}},
        },
    }
    with service_process(config, tmp_path) as service:
        config_file = Path(str(service.process.args[-1]))  # type: ignore[index]

        def idle_of(image: str) -> int | None:
            listed = cli("pools", "list", "--json", "--config", str(config_file))
            assert listed.returncode == 0, listed.stderr
            found = [p["idle"] for p in json.loads(listed.stdout)["pools"] if p["image"] == image]
            return found[0] if found else None

        eventually(lambda: idle_of(IMAGE_A) == 1)
        config["execution"]["image_pools"] = {IMAGE_A: {"min_idle": 2}, IMAGE_B: {"min_idle": 1}}
        config_file.write_text(yaml.safe_dump(config))
        service.process.send_signal(1)  # SIGHUP
        eventually(lambda: idle_of(IMAGE_A) == 2 and idle_of(IMAGE_B) == 1)

        config["execution"]["image_pools"] = {IMAGE_A: {"min_idle": -1}}
        config_file.write_text(yaml.safe_dump(config))
        service.process.send_signal(1)
        eventually(lambda: any("reload (SIGHUP) rejected" in line for line in service.log))
        assert any("image_pools" in line and "min_idle" in line for line in service.log)
        time.sleep(1)
        assert (idle_of(IMAGE_A), idle_of(IMAGE_B)) == (2, 1)  # running settings stayed

        config["execution"]["image_pools"] = {IMAGE_B: {"min_idle": 1}}  # A's entry removed
        config_file.write_text(yaml.safe_dump(config))
        service.process.send_signal(1)
        eventually(lambda: idle_of(IMAGE_A) is None)  # wound down, then forgotten
        assert idle_of(IMAGE_B) == 1
        scaled = cli("pools", "scale", IMAGE_B, "--max", "2", "--config", str(config_file))
        assert scaled.returncode == 0, scaled.stderr
        eventually(lambda: any("operator: pool of" in line for line in service.log))
