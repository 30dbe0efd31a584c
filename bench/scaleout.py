"""Scale-out figures: what BuildGrid in front of our worker costs per action, and a 100-genrule
Bazel build through BuildGrid with one worker and with two.

`run(work)` measures (a PostgreSQL + BuildGrid 0.9.1 of its own, our workers as subprocesses)
and writes bench/results/scaleout.json; `markdown(results)` renders the table. Standalone:
`python -m bench.scaleout`.

On one machine a second worker adds no cores, memory or Docker daemon: both workers share them.
What the two-worker figure shows is that BuildGrid spreads one build over two bots and what that
costs or gains on the same hardware, not the speed-up of a second machine."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import measure
from bench.bazel_build import TARGETS, build_file
from bench.service import ServiceProcess
from tests.e2e.bazel import BAZEL, Bazel, make_workspace
from tests.execution_client import upload_action
from tests.images import IMAGE_A, ensure_test_images
from tests.scaleout.services import (
    FAST_ASSIGNER_S,
    BuildGrid,
    WorkerProcess,
    running_buildgrid,
    worker_config,
)

RESULTS = Path(__file__).parent / "results" / "scaleout.json"
IMAGE = f"docker://{IMAGE_A}"  # as BuildGrid matches it: exactly what the workers offer
CAPACITY = 2  # actions at once per worker (execution.max_concurrent_actions)
ROUNDS = 10  # no-op latency: rounds of 3 actions per path, interleaved


def log(message: str) -> None:
    print(f"[bench scaleout {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _noop_latencies(serve: ServiceProcess, grid: BuildGrid, f: dict[str, Any]) -> None:
    """The same no-op (`true`, uncached) straight to `serve` and through BuildGrid to a worker
    with the same settings; interleaved rounds so machine drift hits both alike."""
    samples: dict[str, list[float]] = {"serve": [], "buildgrid": []}
    with measure.channel(serve.address) as direct, grid.channel() as scheduled:
        channels = {"serve": direct, "buildgrid": scheduled}
        actions = {
            name: upload_action(ch, measure.noop_spec(IMAGE, salt=b"scaleout"))
            for name, ch in channels.items()
        }
        for name, ch in channels.items():
            measure.execute_latencies(ch, actions[name], 0, warmup=3)
        for round_ in range(ROUNDS):
            order = ("serve", "buildgrid") if round_ % 2 == 0 else ("buildgrid", "serve")
            for name in order:
                samples[name] += measure.execute_latencies(
                    channels[name], actions[name], 3, warmup=0
                ).samples
    for name, values in samples.items():
        latencies = measure.Latencies(values)
        f[f"noop_{name}_p50_s"], f[f"noop_{name}_p90_s"] = latencies.p50, latencies.p90
    f["noop_samples"] = len(samples["serve"])
    f["buildgrid_overhead_p50_s"] = f["noop_buildgrid_p50_s"] - f["noop_serve_p50_s"]


def _timed_build(bazel: Bazel, flags: list[str]) -> float:
    bazel.run("clean")
    began = time.perf_counter()
    run = bazel.run("build", *flags)
    seconds = time.perf_counter() - began
    if run.returncode != 0 or run.process_counts().get("remote") != TARGETS:
        raise RuntimeError(f"bazel build through BuildGrid failed:\n{run.output[-3000:]}")
    return seconds


def _bazel_builds(grid: BuildGrid, work: Path, f: dict[str, Any]) -> None:
    """100 genrules, one worker, then two, then one again (the mean of the two one-worker
    builds is the figure, so a drift of the machine does not favour either)."""
    root = work / "bazel"
    root.mkdir()
    bazel = Bazel(make_workspace(root, build_file()), root / "bazel-root")
    flags = [
        f"--remote_executor={grid.url}",
        f"--remote_default_exec_properties=container-image={IMAGE}",
        "--shell_executable=/bin/sh",
        "--noremote_accept_cached",
        "--jobs=8",
        "//:all",
    ]
    try:
        warmup = bazel.run("build", *flags)  # starts Bazel's server, warms the sidecars
        if warmup.returncode != 0:
            raise RuntimeError(f"bazel warm-up build failed:\n{warmup.output[-3000:]}")
        one = [_timed_build(bazel, flags)]
        second = WorkerProcess(
            grid.url, work / "worker-2", worker_config("bench-2", [IMAGE_A], CAPACITY)
        ).start()
        try:
            _timed_build(bazel, flags)  # warms the second worker's sidecars
            before = second.status().get("leases_completed", 0)
            two = _timed_build(bazel, flags)
            time.sleep(1)  # the last reports
            f["bazel_two_workers_second_share"] = (
                second.status().get("leases_completed", 0) - before
            ) / TARGETS
        finally:
            second.terminate()
        one.append(_timed_build(bazel, flags))
    finally:
        bazel.shutdown()
    f["bazel_one_worker_s"] = statistics.mean(one)
    f["bazel_one_worker_runs_s"] = one
    f["bazel_two_workers_s"] = two
    f["bazel_two_over_one"] = two / f["bazel_one_worker_s"]


def run(work: Path) -> dict[str, Any]:
    """All scale-out figures; also written to bench/results/scaleout.json."""
    ensure_test_images()
    work.mkdir(parents=True, exist_ok=True)
    f: dict[str, Any] = {
        "capacity_per_worker": CAPACITY,
        "cores": os.cpu_count(),
        "assigner_interval_s": FAST_ASSIGNER_S,
    }
    began = time.perf_counter()
    log("starting PostgreSQL and BuildGrid 0.9.1")
    with running_buildgrid() as grid:
        f["buildgrid_start_s"] = time.perf_counter() - began
        first = WorkerProcess(
            grid.url, work / "worker-1", worker_config("bench-1", [IMAGE_A], CAPACITY)
        ).start()
        config = worker_config("bench-serve", [IMAGE_A], CAPACITY)
        serve = ServiceProcess(work / "serve", {k: config[k] for k in ("server", "execution")})
        try:
            log("1/3 no-op latency: through BuildGrid to a worker vs straight to serve")
            _noop_latencies(serve, grid, f)
        finally:
            serve.stop()
        try:
            if BAZEL is not None:
                log(f"2/3 Bazel, {TARGETS} genrules through BuildGrid: one worker vs two")
                _bazel_builds(grid, work, f)
            else:
                log("2/3 skipped: Bazel is not installed")
        finally:
            first.terminate()
    log("3/3 no-op latency through BuildGrid with its default assigner (polls every 1-2 s)")
    with running_buildgrid(None) as default_grid:
        worker = WorkerProcess(
            default_grid.url, work / "worker-d", worker_config("bench-d", [IMAGE_A], CAPACITY)
        ).start()
        try:
            with default_grid.channel() as ch:
                action = upload_action(ch, measure.noop_spec(IMAGE, salt=b"default-assigner"))
                default = measure.execute_latencies(ch, action, 15, warmup=3)
        finally:
            worker.terminate()
    f["noop_buildgrid_default_assigner_p50_s"] = default.p50
    f["noop_buildgrid_default_assigner_p90_s"] = default.p90
    f["duration_s"] = time.perf_counter() - began
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "figures": f}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def markdown(results: dict[str, Any]) -> str:
    f = results.get("figures", results)
    rows = [
        "| Scale-out figure | Value |",
        "|---|---|",
        f"| no-op p50 / p90, straight to `serve` | {f['noop_serve_p50_s'] * 1000:.0f} / "
        f"{f['noop_serve_p90_s'] * 1000:.0f} ms |",
        f"| no-op p50 / p90, through BuildGrid to a worker | "
        f"{f['noop_buildgrid_p50_s'] * 1000:.0f} / {f['noop_buildgrid_p90_s'] * 1000:.0f} ms |",
        f"| BuildGrid's cost per action (p50 difference) | "
        f"{f['buildgrid_overhead_p50_s'] * 1000:.0f} ms |",
        f"| no-op p50 / p90 through BuildGrid with its default assigner | "
        f"{f['noop_buildgrid_default_assigner_p50_s'] * 1000:.0f} / "
        f"{f['noop_buildgrid_default_assigner_p90_s'] * 1000:.0f} ms |",
    ]
    if "bazel_one_worker_s" in f:
        rows += [
            f"| Bazel {TARGETS} genrules via BuildGrid, one worker (capacity "
            f"{f['capacity_per_worker']}) | {f['bazel_one_worker_s']:.1f} s |",
            f"| same, two workers on this {f['cores']}-core machine | "
            f"{f['bazel_two_workers_s']:.1f} s ({f['bazel_two_over_one']:.2f}x the time; "
            f"the second ran {f['bazel_two_workers_second_share']:.0%} of the actions) |",
        ]
    rows.append("")
    rows.append(
        f"BuildGrid's assigner looks at the queue every {f['assigner_interval_s']:g} s (+ up to "
        f"{f['assigner_interval_s']:g} s jitter) in these runs, except the default-assigner row "
        "(1 s + up to 1 s). "
        "Both workers share this machine's cores and Docker daemon: the two-worker build shows "
        "BuildGrid spreading one build over two bots, not the gain of a second machine; it has "
        "twice the action slots, a gain one worker with a higher capacity could also get here."
    )
    return "\n".join(rows)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-scaleout-"))
    try:
        results = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
