"""Each figure of the benchmark, measured through the service's public gRPC interface."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.concurrency import items_per_second
from tests.execution_client import ActionSpec, InputFile, execute, upload_action
from tests.reapi_client import bytestream_read, bytestream_write, upload_batch
from worker.digests import Digest
from worker.reapi import re_grpc, re_pb2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Latencies:
    samples: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        return percentile(self.samples, 0.9)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )


def noop_spec(image: str, extra: dict[str, str] | None = None, salt: bytes = b"") -> ActionSpec:
    return ActionSpec(
        argv=["true"],
        action_platform={"container-image": image, **(extra or {})},
        do_not_cache=True,
        salt=salt,
    )


def run_once(ch: grpc.Channel, action: Digest) -> re_pb2.ExecuteResponse:
    response = execute(ch, action, skip_cache_lookup=True).response
    if response.status.code != 0 or response.result.exit_code != 0:
        raise RuntimeError(f"benchmark action failed: {response.status} {response.result}")
    return response


# The intervals of one action, from the client's clock before Execute and after the last message
# and the ExecutedActionMetadata timestamps in between (same host, so the same wall clock).
PHASES: tuple[tuple[str, str, str, str], ...] = (
    ("client_to_queued", "sent", "queued", "client sends -> queued (gRPC in, Execute handler)"),
    ("queue_handoff", "queued", "worker_start", "queued -> worker start (queue hand-off)"),
    (
        "load_action",
        "worker_start",
        "input_fetch_start",
        "worker start -> input fetch (load Action, Command)",
    ),
    (
        "input_fetch",
        "input_fetch_start",
        "input_fetch_completed",
        "input fetch (tree, image, lease sidecar, stage)",
    ),
    (
        "fetch_to_execution",
        "input_fetch_completed",
        "execution_start",
        "input fetched -> execution start",
    ),
    ("execution", "execution_start", "execution_completed", "execution (dispatch and `true`)"),
    (
        "execution_to_upload",
        "execution_completed",
        "output_upload_start",
        "executed -> output upload start",
    ),
    (
        "output_upload",
        "output_upload_start",
        "output_upload_completed",
        "output upload (collect outputs)",
    ),
    (
        "release",
        "output_upload_completed",
        "worker_completed",
        "outputs -> worker completed (release sidecar)",
    ),
    (
        "result_to_client",
        "worker_completed",
        "received",
        "worker completed -> client has the result",
    ),
)


@dataclass
class Timed:
    """End-to-end latencies of some actions, and each one's phases (seconds)."""

    samples: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)

    def extend(self, other: Timed) -> None:
        self.samples += other.samples
        self.phases += other.phases

    def phase_medians(self) -> dict[str, float]:
        return {name: statistics.median(p[name] for p in self.phases) for name, *_ in PHASES}


def phases_of(sent_ns: int, received_ns: int, response: re_pb2.ExecuteResponse) -> dict[str, float]:
    m = response.result.execution_metadata
    stamps = {
        "sent": sent_ns,
        "queued": m.queued_timestamp.ToNanoseconds(),
        "worker_start": m.worker_start_timestamp.ToNanoseconds(),
        "input_fetch_start": m.input_fetch_start_timestamp.ToNanoseconds(),
        "input_fetch_completed": m.input_fetch_completed_timestamp.ToNanoseconds(),
        "execution_start": m.execution_start_timestamp.ToNanoseconds(),
        "execution_completed": m.execution_completed_timestamp.ToNanoseconds(),
        "output_upload_start": m.output_upload_start_timestamp.ToNanoseconds(),
        "output_upload_completed": m.output_upload_completed_timestamp.ToNanoseconds(),
        "worker_completed": m.worker_completed_timestamp.ToNanoseconds(),
        "received": received_ns,
    }
    return {name: (stamps[end] - stamps[start]) / 1e9 for name, start, end, _ in PHASES}


def execute_timed(ch: grpc.Channel, action: Digest, runs: int) -> Timed:
    """`runs` sequential executions of `action`: latency and phases of each."""
    timed = Timed()
    for _ in range(runs):
        sent = time.time_ns()
        began = time.perf_counter()
        response = run_once(ch, action)
        timed.samples.append(time.perf_counter() - began)
        timed.phases.append(phases_of(sent, time.time_ns(), response))
    return timed


def busy_jiffies() -> int:
    """Busy time of the whole machine (all cores, every process), in clock ticks."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal


def settle(max_s: float = 3.0, busy_below: float = 0.25) -> None:
    """Waits (at most max_s) until the machine is mostly idle over 100 ms: the Docker daemon
    finishes tearing down containers and exec sessions in the background, and a block timed
    during that would be charged for the block before it."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        before = _cpu_times()
        time.sleep(0.1)
        after = _cpu_times()
        total = after[0] - before[0]
        if total > 0 and (after[1] - before[1]) / total < busy_below:
            return


def _cpu_times() -> tuple[int, int]:
    """(all ticks, busy ticks) of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields), busy_jiffies()


def process_jiffies(pid: int) -> int:
    """User and system time of one process (all its threads), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@dataclass
class CpuBlock:
    """Busy CPU seconds of the whole host and of one process during a block, and its wall time."""

    host_s: float
    process_s: float
    wall_s: float


def cpu_block(block: Callable[[], None], pid: int) -> CpuBlock:
    tick = os.sysconf("SC_CLK_TCK")
    host, process, began = busy_jiffies(), process_jiffies(pid), time.perf_counter()
    block()
    wall = time.perf_counter() - began
    return CpuBlock((busy_jiffies() - host) / tick, (process_jiffies(pid) - process) / tick, wall)


def execute_latencies(ch: grpc.Channel, action: Digest, runs: int, warmup: int = 3) -> Latencies:
    for _ in range(warmup):
        run_once(ch, action)
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        run_once(ch, action)
        samples.append(time.perf_counter() - began)
    return Latencies(samples)


def make_input_tree(root: Path, files: int, total_bytes: int) -> dict[str, InputFile]:
    """`files` files of random bytes, 50 to a directory, `total_bytes` in all; also on disk."""
    size = total_bytes // files
    tree = {}
    for i in range(files):
        path = f"d{i // 50:03}/f{i:04}.bin"
        data = os.urandom(size)
        tree[path] = InputFile(data)
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return tree


def staging_seconds(response: re_pb2.ExecuteResponse) -> float:
    metadata = response.result.execution_metadata
    return (
        metadata.input_fetch_completed_timestamp.ToNanoseconds()
        - metadata.input_fetch_start_timestamp.ToNanoseconds()
    ) / 1e9


def throughput(address: str, image: str, total: int, concurrency: int, salt: str) -> float:
    """Actions per second: `concurrency` client threads, each with its own connected channel,
    share `total` distinct no-op actions (uploaded beforehand, not timed)."""
    with channel(address) as ch:
        actions = [
            upload_action(ch, noop_spec(image, salt=f"{salt}-{i}".encode())) for i in range(total)
        ]
    channels = [channel(address) for _ in range(concurrency)]
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)
        return items_per_second(actions, channels, run_once)
    finally:
        for ch in channels:
            ch.close()


def cas_figures(address: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    with channel(address) as ch:
        big = os.urandom(100 * 1024 * 1024)
        began = time.perf_counter()
        bytestream_write(ch, big, chunk=1024 * 1024)
        figures["bytestream_write_MBps"] = 100 / (time.perf_counter() - began)
        began = time.perf_counter()
        read = bytestream_read(ch, Digest.of(big))
        figures["bytestream_read_MBps"] = 100 / (time.perf_counter() - began)
        assert read == big
        del big, read

        digests = [Digest.of(f"probe {i}".encode()).to_proto() for i in range(10_000)]
        stub = re_grpc.ContentAddressableStorageStub(ch)
        stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests))
        began = time.perf_counter()
        stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests))
        figures["find_missing_10k_ms"] = (time.perf_counter() - began) * 1000

        blobs = [os.urandom(1024) for _ in range(1000)]
        began = time.perf_counter()
        upload_batch(ch, *blobs)
        figures["batch_update_1000_ms"] = (time.perf_counter() - began) * 1000
    return figures
