"""Runs every figure of `make bench` in one run against one service process."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import measure, raw_docker, report
from bench.bazel_build import build_seconds
from bench.service import ServiceProcess
from tests.e2e.bazel import BAZEL
from tests.execution_client import ActionSpec, upload_action
from tests.images import IMAGE_A, IMAGE_B, ensure_test_images

RESULTS = Path(__file__).parent / "results"


def service_config(extra_pools: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "server": {"worker_name": "bench"},
        "execution": {
            "max_concurrent_actions": 8,
            "allowed_images": ["sidecar-test/*"],
            "pool": {"max_sidecars": 8, "idle_ttl_s": 600},
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


def run(work: Path) -> dict[str, Any]:
    f: dict[str, Any] = {}
    service = ServiceProcess(work / "service", service_config())
    try:
        with measure.channel(service.address) as ch:
            log("1/8 to 3/8: raw exec, no-op action on a warm pool, container per action")
            warm_action = upload_action(ch, measure.noop_spec(IMAGE_A))
            fresh_action = upload_action(ch, measure.noop_spec(IMAGE_A, {"sidecar-reuse": "false"}))
            measure.execute_latencies(ch, warm_action, 0, warmup=3)
            measure.execute_latencies(ch, fresh_action, 0, warmup=1)
            floor_samples: list[float] = []
            warm_samples: list[float] = []
            fresh_samples: list[float] = []
            lifecycle_samples: list[float] = []
            with raw_docker.warm_containers(IMAGE_A, 1) as (container,):
                raw_docker.exec_latencies(container, runs=3)
                for round_ in range(20):
                    # Interleaved in small rounds, so the machine's drift hits every figure
                    # alike and the ratios compare like with like.
                    floor_samples += raw_docker.exec_latencies(container, runs=3, warmup=False)
                    warm_samples += measure.execute_latencies(ch, warm_action, 3, warmup=0).samples
                    if round_ % 2 == 0:
                        fresh_samples += measure.execute_latencies(
                            ch, fresh_action, 1, warmup=0
                        ).samples
                        lifecycle_samples += raw_docker.container_per_action_latencies(IMAGE_A, 1)
            noop, fresh = measure.Latencies(warm_samples), measure.Latencies(fresh_samples)
            f["floor_p50_s"] = statistics.median(floor_samples)
            f["noop_p50_s"], f["noop_p90_s"] = noop.p50, noop.p90
            f["noop_over_floor"] = noop.p50 / f["floor_p50_s"]
            f["fresh_p50_s"] = fresh.p50
            f["fresh_over_noop"] = fresh.p50 / noop.p50
            f["raw_container_per_action_p50_s"] = statistics.median(lifecycle_samples)
            f["raw_lifecycle_over_floor"] = f["raw_container_per_action_p50_s"] / f["floor_p50_s"]

            log("4/8 input-heavy action (2,000 files, 50 MB)")
            tree = measure.make_input_tree(work / "tree", 2000, 50 * 1024 * 1024)
            heavy_spec = ActionSpec(
                argv=["true"],
                files=tree,
                action_platform={"container-image": IMAGE_A},
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
            with raw_docker.warm_containers(IMAGE_A, 1) as (container,):
                copies = [
                    raw_docker.copy_tree_into_container(container, files, "/tmp/inputs")
                    for _ in range(5)
                ]
            f["heavy_staging_p50_s"] = statistics.median(staging[2:])
            f["heavy_e2e_p50_s"] = statistics.median(e2e[2:])
            f["heavy_copy_p50_s"] = statistics.median(copies)
            f["copy_over_staging"] = f["heavy_copy_p50_s"] / f["heavy_staging_p50_s"]
            del files, tree

            log("5/8 throughput, ours and raw in alternating blocks")
            f["throughput_concurrency"] = [1, 2, 4, 8]
            f["throughput_ours"], f["throughput_raw"] = [], []
            for c in f["throughput_concurrency"]:
                ours: list[float] = []
                raw: list[float] = []
                # Eight blocks of 50 actions in ABBA order: 200 of ours, 200 raw execs.
                for trial in ("ours", "raw", "raw", "ours") * 2:
                    if trial == "ours":
                        salt = f"c{c}-{len(ours)}"
                        ours.append(measure.throughput(service.address, IMAGE_A, 50, c, salt))
                    else:
                        with raw_docker.warm_containers(IMAGE_A, c) as containers:
                            raw.append(raw_docker.exec_throughput(containers, 50))
                f["throughput_ours"].append(statistics.mean(ours))
                f["throughput_raw"].append(statistics.mean(raw))

            log("6/8 cold start")
            cold = []
            for uid in range(2001, 2006):  # a new user means a new pool, so no warm sidecar
                action = upload_action(
                    ch, measure.noop_spec(IMAGE_B, {"dockerUser": str(uid)}, salt=b"cold")
                )
                began = time.perf_counter()
                measure.run_once(ch, action)
                cold.append(time.perf_counter() - began)
            f["cold_start_p50_s"] = statistics.median(cold)

            log("7/8 CAS")
            f.update(measure.cas_figures(service.address))

            if BAZEL is not None:
                log("8/8 Bazel, 100 genrules")
                bazel = build_seconds(service.address, IMAGE_A, work / "bazel")
                f["bazel_warm_pool_s"] = bazel["warm_pool"]
                f["bazel_container_per_action_s"] = bazel["container_per_action"]
            else:
                log("8/8 skipped: Bazel is not installed")
        f["peak_rss_MiB"] = service.peak_rss_bytes() / 2**20
    finally:
        service.stop()

    log("6/8 (continued) first action on pre-warmed pools")
    prewarmed = []
    for i in range(3):
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
    json_path, png_path = report.write(results, RESULTS)
    print()
    print(report.table(results))
    print(f"\n{results['machine']['summary']}; run took {results['duration_s']} s")
    print(f"written: {json_path} {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
