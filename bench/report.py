"""Prints the table and writes the JSON and the plot, all from one run's figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(r: dict[str, Any]) -> str:
    f = r["figures"]
    rows = [
        ("1 floor: raw docker exec `true` (Engine API), p50", ms(f["floor_p50_s"]), ""),
        (
            "2 no-op action via gRPC Execute, warm pool, p50",
            ms(f["noop_p50_s"]),
            f"{f['noop_over_floor']:.2f}x floor "
            f"(target <= 1.3x: {verdict(f['noop_over_floor'] <= 1.3)})",
        ),
        ("  no-op action, p90", ms(f["noop_p90_s"]), ""),
        (
            "3 container per action (sidecar-reuse=false), p50",
            ms(f["fresh_p50_s"]),
            f"warm pool {f['fresh_over_noop']:.1f}x faster (target >= 4x: "
            f"{verdict(f['fresh_over_noop'] >= 4)})",
        ),
        (
            "  raw create+start+exec+rm through the Engine API, p50",
            ms(f["raw_container_per_action_p50_s"]),
            f"{f['raw_lifecycle_over_floor']:.1f}x the raw exec on this daemon",
        ),
        (
            "4 input-heavy (2,000 files, 50 MB): staging, p50",
            ms(f["heavy_staging_p50_s"]),
            f"target < 100 ms: {verdict(f['heavy_staging_p50_s'] < 0.1)}",
        ),
        ("  input-heavy action end to end, p50", ms(f["heavy_e2e_p50_s"]), ""),
        (
            "  copy of the same tree into a container (tar + put_archive), p50",
            ms(f["heavy_copy_p50_s"]),
            f"staging {f['copy_over_staging']:.0f}x faster (target >= 10x: "
            f"{verdict(f['copy_over_staging'] >= 10)})",
        ),
    ]
    for c, ours, raw in zip(
        f["throughput_concurrency"], f["throughput_ours"], f["throughput_raw"], strict=True
    ):
        rows.append(
            (
                f"5 throughput at concurrency {c} (200 actions)",
                f"{ours:.1f}/s",
                f"raw ceiling {raw:.1f}/s, {ours / raw:.0%} (target >= 80%: "
                f"{verdict(ours / raw >= 0.8)})",
            )
        )
    rows += [
        ("6 cold start: first action, new pool, p50", ms(f["cold_start_p50_s"]), ""),
        ("  first action on a pre-warmed pool, p50", ms(f["prewarmed_first_p50_s"]), ""),
        ("7 ByteStream write 100 MB", f"{f['bytestream_write_MBps']:.0f} MB/s", ""),
        ("  ByteStream read 100 MB", f"{f['bytestream_read_MBps']:.0f} MB/s", ""),
        ("  FindMissingBlobs, 10,000 digests", f"{f['find_missing_10k_ms']:.1f} ms", ""),
        ("  BatchUpdateBlobs, 1,000 x 1 KiB", f"{f['batch_update_1000_ms']:.1f} ms", ""),
    ]
    if "bazel_warm_pool_s" in f:
        rows.append(
            (
                "8 Bazel, 100 genrules, --jobs=8: warm pools",
                f"{f['bazel_warm_pool_s']:.1f} s",
                f"container per action {f['bazel_container_per_action_s']:.1f} s "
                f"({f['bazel_container_per_action_s'] / f['bazel_warm_pool_s']:.1f}x slower)",
            )
        )
    rows.append(("9 peak memory of the service (VmHWM)", f"{f['peak_rss_MiB']:.0f} MiB", ""))
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    lines = [
        f"| {'figure':<{width}} | {'value':>{value_width}} | against |",
        f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|---|",
    ]
    lines += [f"| {a:<{width}} | {b:>{value_width}} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def write(results: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    png_path = directory / "bench.png"
    f = results["figures"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [
        "raw exec\n(floor)",
        "no-op\nwarm pool",
        "container\nper action",
        "cold start\n(new pool)",
    ]
    values = [f["floor_p50_s"], f["noop_p50_s"], f["fresh_p50_s"], f["cold_start_p50_s"]]
    left.bar(labels, [v * 1000 for v in values], color=["#888", "#2a7", "#c55", "#d93"])
    left.set_ylabel("p50 latency (ms)")
    left.set_title("One tiny action")
    right.plot(
        f["throughput_concurrency"], f["throughput_raw"], "o--", label="raw docker exec ceiling"
    )
    right.plot(f["throughput_concurrency"], f["throughput_ours"], "o-", label="sidecar-executor")
    right.set_xlabel("client concurrency")
    right.set_ylabel("actions / s")
    right.set_xticks(f["throughput_concurrency"])
    right.set_title("Throughput, 200 tiny actions")
    right.legend()
    figure.suptitle(f"sidecar-executor bench, {results['machine']['summary']}")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return json_path, png_path
