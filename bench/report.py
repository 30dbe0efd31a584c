"""Prints the tables and writes the JSON and the plot, all from one run's figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.measure import PHASES


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every target with its value in this run and whether it was met; the JSON holds these
    and the table's verdicts are these."""
    agent_p50, over_agent, c8 = f["noop_agent_p50_s"], f["exec_over_agent"], f["agent_over_exec_c8"]
    checks = [
        ("noop_exec_over_floor", "exec no-op p50 <= 1.3x raw exec", f["noop_exec_over_floor"],
         f["noop_exec_over_floor"] <= 1.3),
        ("agent_noop_p50", "agent no-op p50 <= 10 ms", agent_p50, agent_p50 <= 0.010),
        ("exec_over_agent", "agent no-op p50 >= 6x faster than exec", over_agent, over_agent >= 6),
        ("agent_over_exec_c8", "agent throughput at concurrency 8 >= 5x exec", c8, c8 >= 5),
        ("fresh_over_noop", "warm pool (exec) >= 4x faster than a container per action",
         f["fresh_over_noop"], f["fresh_over_noop"] >= 4),
        ("heavy_staging", "staging 2,000 files / 50 MB < 100 ms", f["heavy_staging_p50_s"],
         f["heavy_staging_p50_s"] < 0.1),
        ("copy_over_staging", "staging >= 10x faster than tar + put_archive",
         f["copy_over_staging"], f["copy_over_staging"] >= 10),
    ]  # fmt: skip
    for c, ours, raw in zip(
        f["throughput_concurrency"], f["throughput_exec"], f["throughput_raw"], strict=True
    ):
        checks.append(
            (
                f"throughput_exec_c{c}",
                f"exec throughput at concurrency {c} >= 80% of raw exec",
                ours / raw,
                ours / raw >= 0.8,
            )
        )
    return {key: {"target": text, "value": value, "met": met} for key, text, value, met in checks}


def table(r: dict[str, Any]) -> str:
    f = r["figures"]
    t = r["targets"]

    def v(key: str) -> str:
        return verdict(t[key]["met"])

    exec_cpu, agent_cpu = f["cpu_exec_host_ms"], f["cpu_agent_host_ms"]
    cores = int(r["machine"]["cores"])
    rows = [
        ("1 floor: raw docker exec `true` (Engine API), p50", ms(f["floor_p50_s"]), ""),
        ("  raw docker exec `true`, p90", ms(f["floor_p90_s"]), ""),
        (
            "2 no-op action via gRPC Execute, dispatch exec, p50",
            ms(f["noop_exec_p50_s"]),
            f"{f['noop_exec_over_floor']:.2f}x floor (target <= 1.3x: {v('noop_exec_over_floor')})",
        ),
        ("  no-op action, dispatch exec, p90", ms(f["noop_exec_p90_s"]), ""),
        (
            "  no-op action via gRPC Execute, dispatch agent, p50",
            ms(f["noop_agent_p50_s"]),
            f"target <= 10 ms: {v('agent_noop_p50')}; exec path {f['exec_over_agent']:.1f}x "
            f"slower (target >= 6x: {v('exec_over_agent')})",
        ),
        (
            "  no-op action, dispatch agent, p90",
            ms(f["noop_agent_p90_s"]),
            f"{f['noop_agent_over_floor']:.2f}x the raw exec floor (p50)",
        ),
        (
            "  host CPU per action (whole machine): raw docker exec",
            f"{f['cpu_raw_host_ms']:.1f} ms",
            f"busy time of all cores (/proc/stat) less {f['cpu_background_cores']:.2f} cores "
            "of background",
        ),
        (
            "  host CPU per action (whole machine): dispatch exec",
            f"{exec_cpu:.1f} ms",
            f"service process {f['cpu_exec_service_ms']:.1f} ms of it; "
            f"{cores} cores' worth: {cores * 1000 / exec_cpu:.0f}/s",
        ),
        (
            "  host CPU per action (whole machine): dispatch agent",
            f"{agent_cpu:.1f} ms",
            f"service process {f['cpu_agent_service_ms']:.1f} ms of it; "
            f"{cores} cores' worth: {cores * 1000 / agent_cpu:.0f}/s",
        ),
        (
            "3 container per action (sidecar-reuse=false), p50",
            ms(f["fresh_p50_s"]),
            f"warm pool (exec) {f['fresh_over_noop']:.1f}x faster (target >= 4x: "
            f"{v('fresh_over_noop')}); agent {f['fresh_p50_s'] / f['noop_agent_p50_s']:.0f}x",
        ),
        (
            "  raw create+start+exec+rm through the Engine API, p50",
            ms(f["raw_container_per_action_p50_s"]),
            f"{f['raw_lifecycle_over_floor']:.1f}x the raw exec on this daemon",
        ),
        (
            "4 input-heavy (2,000 files, 50 MB): staging, p50",
            ms(f["heavy_staging_p50_s"]),
            f"target < 100 ms: {v('heavy_staging')}",
        ),
        ("  input-heavy action end to end, p50", ms(f["heavy_e2e_p50_s"]), ""),
        (
            "  copy of the same tree into a container (tar + put_archive), p50",
            ms(f["heavy_copy_p50_s"]),
            f"staging {f['copy_over_staging']:.0f}x faster (target >= 10x: "
            f"{v('copy_over_staging')})",
        ),
    ]
    for c, ours, agent, raw in zip(
        f["throughput_concurrency"],
        f["throughput_exec"],
        f["throughput_agent"],
        f["throughput_raw"],
        strict=True,
    ):
        rows.append(
            (
                f"5 throughput at concurrency {c}, dispatch exec (200 actions)",
                f"{ours:.1f}/s",
                f"raw ceiling {raw:.1f}/s, {ours / raw:.0%} (target >= 80%: "
                f"{v(f'throughput_exec_c{c}')})",
            )
        )
        against = f"{agent / ours:.1f}x exec, {agent / raw:.1f}x the raw exec ceiling"
        if c == 8:
            against += f" (target >= 5x exec: {v('agent_over_exec_c8')})"
        rows.append((f"  throughput at concurrency {c}, dispatch agent", f"{agent:.1f}/s", against))
    rows += [
        ("6 cold start: first action, new pool, exec, p50", ms(f["cold_start_exec_p50_s"]), ""),
        ("  cold start: first action, new pool, agent, p50", ms(f["cold_start_agent_p50_s"]), ""),
        ("  first action on a pre-warmed pool (exec), p50", ms(f["prewarmed_first_p50_s"]), ""),
        ("7 ByteStream write 100 MB", f"{f['bytestream_write_MBps']:.0f} MB/s", ""),
        ("  ByteStream read 100 MB", f"{f['bytestream_read_MBps']:.0f} MB/s", ""),
        ("  FindMissingBlobs, 10,000 digests", f"{f['find_missing_10k_ms']:.1f} ms", ""),
        ("  BatchUpdateBlobs, 1,000 x 1 KiB", f"{f['batch_update_1000_ms']:.1f} ms", ""),
    ]
    if "bazel_exec_s" in f:
        rows += [
            (
                "8 Bazel, 100 genrules, --jobs=8: warm pools, dispatch exec",
                f"{f['bazel_exec_s']:.1f} s",
                f"container per action {f['bazel_container_per_action_s']:.1f} s "
                f"({f['bazel_container_per_action_s'] / f['bazel_exec_s']:.1f}x slower)",
            ),
            (
                "  Bazel, 100 genrules, --jobs=8: warm pools, dispatch agent",
                f"{f['bazel_agent_s']:.1f} s",
                f"{f['bazel_exec_s'] / f['bazel_agent_s']:.1f}x faster than exec",
            ),
        ]
    rows.append(("9 peak memory of the service (VmHWM)", f"{f['peak_rss_MiB']:.0f} MiB", ""))
    return markdown(("figure", "value", "against"), rows)


def markdown(header: tuple[str, str, str], rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = [
        f"| {header[0]:<{widths[0]}} | {header[1]:>{widths[1]}} | {header[2]:<{widths[2]}} |",
        f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 1)}:|{'-' * (widths[2] + 2)}|",
    ]
    lines += [f"| {a:<{widths[0]}} | {b:>{widths[1]}} | {c:<{widths[2]}} |" for a, b, c in rows]
    return "\n".join(lines)


def largest_phase(f: dict[str, Any], mode: str = "agent") -> tuple[str, float]:
    phases: dict[str, float] = f[f"phases_{mode}_s"]
    name = max(phases, key=lambda key: phases[key])
    return name, phases[name]


def phase_table(r: dict[str, Any]) -> str:
    f = r["figures"]
    agent, exec_ = f["phases_agent_s"], f["phases_exec_s"]
    rows = [(label, ms(agent[name]), ms(exec_[name])) for name, _, _, label in PHASES]
    rows += [
        ("sum of the phases' medians", ms(sum(agent.values())), ms(sum(exec_.values()))),
        ("end to end, p50", ms(f["noop_agent_p50_s"]), ms(f["noop_exec_p50_s"])),
    ]
    name, seconds = largest_phase(f)
    label = next(label for key, _, _, label in PHASES if key == name)
    header = (f"phase of a no-op action (median of {f['phases_samples']} each)", "agent", "exec")
    return (
        markdown(header, rows) + f"\nlargest phase with dispatch agent: {label}, {ms(seconds)} "
        f"({seconds / f['noop_agent_p50_s']:.0%} of the end-to-end p50)"
    )


def write(results: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    png_path = directory / "bench.png"
    f = results["figures"]
    figure, (left, middle, right) = plt.subplots(
        1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.1, 1, 1]}
    )
    labels = [
        "raw exec\n(floor)",
        "no-op\nexec",
        "no-op\nagent",
        "container\nper\naction",
        "cold\nstart\n(exec)",
    ]
    values = [
        f["floor_p50_s"],
        f["noop_exec_p50_s"],
        f["noop_agent_p50_s"],
        f["fresh_p50_s"],
        f["cold_start_exec_p50_s"],
    ]
    bars = left.bar(
        labels, [v * 1000 for v in values], color=["#888", "#2a7", "#27c", "#c55", "#d93"]
    )
    left.bar_label(bars, fmt="%.1f")
    left.set_ylabel("p50 latency (ms)")
    left.set_title("One tiny action")
    concurrency = f["throughput_concurrency"]
    middle.plot(concurrency, f["throughput_raw"], "o--", color="#888", label="raw docker exec")
    middle.plot(concurrency, f["throughput_exec"], "o-", color="#2a7", label="dispatch exec")
    middle.plot(concurrency, f["throughput_agent"], "o-", color="#27c", label="dispatch agent")
    middle.set_xlabel("client concurrency")
    middle.set_ylabel("actions / s")
    middle.set_xticks(concurrency)
    middle.set_title("Throughput, 200 tiny actions")
    middle.legend()
    phases = f["phases_agent_s"]
    names = [key.replace("_", " ") for key, *_ in PHASES][::-1]
    bars = right.barh(names, [phases[key] * 1000 for key, *_ in PHASES][::-1], color="#27c")
    right.bar_label(bars, fmt="%.2f")
    right.set_xlabel("median (ms)")
    right.set_title("Phases of a no-op action, dispatch agent")
    figure.suptitle(f"sidecar-executor bench, {results['machine']['summary']}")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return json_path, png_path
