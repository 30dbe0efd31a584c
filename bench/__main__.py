"""Runs every figure of `make bench` in one run against one service process."""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench import cas, measure, raw_docker, report, scaleout
from bench.bazel_build import build_seconds
from bench.service import ServiceProcess
from tests.e2e.bazel import BAZEL
from tests.execution_client import ActionSpec, upload_action
from tests.images import IMAGE_A, IMAGE_B, ensure_test_images

RESULTS = Path(__file__).parent / "results"

# One service, both dispatch modes: the default pool (IMAGE_A's actions) starts each action with
# a `docker exec` of the runner, IMAGE_B's pool through the agent. The two images have the same
# busybox content, so the two modes run the very same no-op.
EXEC_IMAGE = IMAGE_A
AGENT_IMAGE = IMAGE_B
AGENT_POOL = {"dispatch": "agent", "max_sidecars": 8, "idle_ttl_s": 600}
MODES = {"exec": EXEC_IMAGE, "agent": AGENT_IMAGE}


def service_config(extra_pools: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "server": {"worker_name": "bench"},
        "execution": {
            "max_concurrent_actions": 8,
            # Room for both warm pools of 8, the cold-start pools and fresh containers, so no
            # figure evicts the sidecars another one warmed.
            "max_sidecars_total": 40,
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": 8, "idle_ttl_s": 600, "dispatch": "exec"},
            "image_pools": extra_pools or {},
        },
    }


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_GiB": f"{memory_kib / 2**20:.0f}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "summary": f"{os.cpu_count()} cores, {memory_kib / 2**20:.0f} GiB, {platform.release()}",
    }


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def latencies(ch: grpc.Channel, f: dict[str, Any]) -> None:
    """No-op latency of the raw exec, both dispatch modes and a container per action, in
    interleaved rounds; the phases of each no-op action come from its metadata."""
    warm = {mode: upload_action(ch, measure.noop_spec(image)) for mode, image in MODES.items()}
    fresh_action = upload_action(ch, measure.noop_spec(EXEC_IMAGE, {"sidecar-reuse": "false"}))
    for action in warm.values():
        measure.execute_latencies(ch, action, 0, warmup=3)
    measure.execute_latencies(ch, fresh_action, 0, warmup=1)
    floor_samples: list[float] = []
    timed = {mode: measure.Timed() for mode in MODES}
    fresh_samples: list[float] = []
    lifecycle_samples: list[float] = []
    with raw_docker.warm_containers(EXEC_IMAGE, 1) as (container,):
        raw_docker.exec_latencies(container, runs=3)
        for round_ in range(20):
            # Interleaved in small rounds, so the machine's drift hits every figure alike and
            # the ratios compare like with like.
            floor_samples += raw_docker.exec_latencies(container, runs=3, warmup=False)
            for mode in ("exec", "agent") if round_ % 2 == 0 else ("agent", "exec"):
                timed[mode].extend(measure.execute_timed(ch, warm[mode], 3))
            if round_ % 2 == 0:
                fresh_samples += measure.execute_latencies(ch, fresh_action, 1, warmup=0).samples
                lifecycle_samples += raw_docker.container_per_action_latencies(EXEC_IMAGE, 1)
                measure.settle()
    floor = measure.Latencies(floor_samples)
    f["floor_p50_s"], f["floor_p90_s"] = floor.p50, floor.p90
    for mode in MODES:
        noop = measure.Latencies(timed[mode].samples)
        f[f"noop_{mode}_p50_s"], f[f"noop_{mode}_p90_s"] = noop.p50, noop.p90
        f[f"noop_{mode}_over_floor"] = noop.p50 / floor.p50
        f[f"phases_{mode}_s"] = timed[mode].phase_medians()
    f["phases_samples"] = len(timed["agent"].phases)
    f["exec_over_agent"] = f["noop_exec_p50_s"] / f["noop_agent_p50_s"]
    f["fresh_p50_s"] = statistics.median(fresh_samples)
    f["fresh_over_noop"] = f["fresh_p50_s"] / f["noop_exec_p50_s"]
    f["raw_container_per_action_p50_s"] = statistics.median(lifecycle_samples)
    f["raw_lifecycle_over_floor"] = f["raw_container_per_action_p50_s"] / floor.p50


def host_cpu(ch: grpc.Channel, service_pid: int, f: dict[str, Any]) -> None:
    """CPU per no-op action of the whole host: the busy time of all cores and every process
    (service, dockerd, containerd, shims, runc, the sidecar, this client) during blocks of
    sequential actions of one mode, less the machine's background (other work on this shared
    machine), which idle blocks measure in between. The modes' blocks are interleaved in
    rounds; each figure is the median block."""
    warm = {mode: upload_action(ch, measure.noop_spec(image)) for mode, image in MODES.items()}
    # Blocks of about a second each: /proc/stat counts in 10 ms ticks.
    sizes = {"raw": 15, "exec": 15, "agent": 100, "idle": 1}
    blocks: dict[str, list[measure.CpuBlock]] = {mode: [] for mode in sizes}
    with raw_docker.warm_containers(EXEC_IMAGE, 1) as (container,):
        raw_docker.exec_latencies(container, runs=3)

        def block(mode: str) -> None:
            if mode == "idle":
                time.sleep(1.0)
            elif mode == "raw":
                raw_docker.exec_latencies(container, sizes["raw"], warmup=False)
            else:
                measure.execute_latencies(ch, warm[mode], sizes[mode], warmup=0)

        order = list(sizes)
        for round_ in range(5):
            for mode in order[round_ % 4 :] + order[: round_ % 4]:
                blocks[mode].append(measure.cpu_block(functools.partial(block, mode), service_pid))
    background = statistics.median(b.host_s / b.wall_s for b in blocks["idle"])
    f["cpu_background_cores"] = background
    for mode in ("raw", "exec", "agent"):
        n = sizes[mode]
        f[f"cpu_{mode}_host_ms"] = 1000 * statistics.median(
            (b.host_s - background * b.wall_s) / n for b in blocks[mode]
        )
        f[f"cpu_{mode}_host_uncorrected_ms"] = 1000 * statistics.median(
            b.host_s / n for b in blocks[mode]
        )
        if mode != "raw":
            f[f"cpu_{mode}_service_ms"] = 1000 * statistics.median(
                b.process_s / n for b in blocks[mode]
            )


def throughputs(address: str, f: dict[str, Any]) -> None:
    """Both modes and the raw exec ceiling at each concurrency, in blocks of 50 in an order
    that gives each the same share of every position: 200 actions of each."""
    f["throughput_concurrency"] = [1, 2, 4, 8]
    for mode in ("exec", "agent", "raw"):
        f[f"throughput_{mode}"] = []
    for c in f["throughput_concurrency"]:
        for mode, image in MODES.items():  # grows each pool to c sidecars before the clock
            measure.throughput(address, image, 2 * c, c, f"{mode}-c{c}-warmup")
        rates: dict[str, list[float]] = {"exec": [], "agent": [], "raw": []}
        for trial in ("exec", "agent", "raw", "raw", "agent", "exec") * 2:
            measure.settle()
            if trial == "raw":
                with raw_docker.warm_containers(EXEC_IMAGE, c) as containers:
                    rates["raw"].append(raw_docker.exec_throughput(containers, 50))
            else:
                salt = f"{trial}-c{c}-{len(rates[trial])}"
                rates[trial].append(measure.throughput(address, MODES[trial], 50, c, salt))
        for mode, values in rates.items():
            f[f"throughput_{mode}"].append(statistics.mean(values))
    f["agent_over_exec_c8"] = f["throughput_agent"][-1] / f["throughput_exec"][-1]


def cold_starts(ch: grpc.Channel, f: dict[str, Any]) -> None:
    """The first action of a new pool: a user no action has named yet means a new pool."""
    for mode, image in MODES.items():
        cold = []
        for uid in range(2001, 2006):
            action = upload_action(
                ch, measure.noop_spec(image, {"dockerUser": str(uid)}, salt=b"cold")
            )
            began = time.perf_counter()
            measure.run_once(ch, action)
            cold.append(time.perf_counter() - began)
        f[f"cold_start_{mode}_p50_s"] = statistics.median(cold)


def input_heavy(ch: grpc.Channel, work: Path, f: dict[str, Any]) -> None:
    tree = measure.make_input_tree(work / "tree", 2000, 50 * 1024 * 1024)
    heavy_spec = ActionSpec(
        argv=["true"],
        files=tree,
        action_platform={"container-image": EXEC_IMAGE},
        do_not_cache=True,
    )
    heavy_action = upload_action(ch, heavy_spec)
    staging, e2e = [], []
    for _ in range(7):
        began = time.perf_counter()
        response = measure.run_once(ch, heavy_action)
        e2e.append(time.perf_counter() - began)
        staging.append(measure.staging_seconds(response))
    files = raw_docker.read_files(work / "tree")
    with raw_docker.warm_containers(EXEC_IMAGE, 1) as (container,):
        copies = [
            raw_docker.copy_tree_into_container(container, files, "/tmp/inputs") for _ in range(5)
        ]
    f["heavy_staging_p50_s"] = statistics.median(staging[2:])
    f["heavy_e2e_p50_s"] = statistics.median(e2e[2:])
    f["heavy_copy_p50_s"] = statistics.median(copies)
    f["copy_over_staging"] = f["heavy_copy_p50_s"] / f["heavy_staging_p50_s"]


def run(work: Path) -> dict[str, Any]:
    f: dict[str, Any] = {}
    service = ServiceProcess(work / "service", service_config({AGENT_IMAGE: AGENT_POOL}))
    try:
        with measure.channel(service.address) as ch:
            log("1/9 no-op latency: raw exec, exec, agent, container per action, interleaved")
            latencies(ch, f)
            log("2/9 host CPU per no-op action: raw exec, exec, agent")
            host_cpu(ch, service.process.pid, f)
            log("3/9 input-heavy action (2,000 files, 50 MB)")
            input_heavy(ch, work, f)
            log("4/9 throughput at concurrency 1/2/4/8: exec, agent, raw exec")
            throughputs(service.address, f)
            log("5/9 cold start, both modes")
            cold_starts(ch, f)
            log("6/9 CAS")
            f.update(measure.cas_figures(service.address))
            if BAZEL is not None:
                log("7/9 Bazel, 100 genrules: exec, agent, container per action")
                bazel = build_seconds(service.address, EXEC_IMAGE, AGENT_IMAGE, work / "bazel")
                f["bazel_exec_s"] = bazel["exec"]
                f["bazel_agent_s"] = bazel["agent"]
                f["bazel_container_per_action_s"] = bazel["container_per_action"]
            else:
                log("7/9 skipped: Bazel is not installed")
        f["peak_rss_MiB"] = service.peak_rss_bytes() / 2**20
    finally:
        service.stop()

    log("8/9 first action on pre-warmed pools (a service each)")
    prewarmed = []
    for i in range(3):
        # Its own pool settings for IMAGE_B (dispatch exec), min_idle 1: warm at startup.
        warm = ServiceProcess(
            work / f"prewarmed-{i}", service_config({IMAGE_B: {"min_idle": 1, "max_sidecars": 2}})
        )
        try:
            with measure.channel(warm.address) as ch:
                action = upload_action(ch, measure.noop_spec(IMAGE_B, salt=f"warm{i}".encode()))
                began = time.perf_counter()
                measure.run_once(ch, action)
                prewarmed.append(time.perf_counter() - began)
        finally:
            warm.stop()
    f["prewarmed_first_p50_s"] = statistics.median(prewarmed)
    return f


def main() -> int:
    ensure_test_images()
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    began = time.perf_counter()
    try:
        figures = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "duration_s": round(time.perf_counter() - began, 1),
        "figures": figures,
    }
    log("9/9 report")
    results["targets"] = report.targets(figures)
    json_path, png_path = report.write(results, RESULTS)
    print()
    print(report.table(results))
    print()
    print(report.phase_table(results))
    print(f"\n{results['machine']['summary']}; run took {results['duration_s']} s")
    print(f"written: {json_path} {png_path}")
    # The CAS against BuildGrid and a bare gRPC server, then the scale-out shape (each a
    # module that also runs alone: `python -m bench.cas`, `python -m bench.scaleout`).
    for name, module in (("CAS", cas), ("scale-out", scaleout)):
        log(f"{name}: {module.__doc__.splitlines()[0] if module.__doc__ else ''}")
        part = Path(tempfile.mkdtemp(prefix=f"sidecar-bench-{module.__name__[6:]}-"))
        try:
            figures = module.run(part)
        finally:
            shutil.rmtree(part, ignore_errors=True)
        if module is cas:
            (RESULTS / "cas.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        print()
        print(module.markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
