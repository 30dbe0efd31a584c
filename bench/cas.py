"""The CAS benchmark: our disk CAS against BuildGrid 0.9.1's in-memory LRU CAS and a bare
grpc.aio server that stores nothing (bench/cas_ceiling.py), in one run, interleaved in rounds
so the machine's drift hits every target alike.

The client is independent of the service: plain grpc.aio channels and the generated stubs,
hashing with hashlib. Every target runs as its own process. Our service runs twice, with
`storage.durability` none (the default) and fsync, to measure what fsync costs.

Run on its own: `.venv/bin/python -m bench.cas` (writes bench/results/cas.json and prints
the README table). `run(work)` returns the figures; `markdown(results)` formats them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from google.bytestream import bytestream_pb2 as bs_pb2
from google.bytestream import bytestream_pb2_grpc as bs_grpc

from bench.service import ServiceProcess

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
BUILDGRID_VENV = REPO / ".buildgrid" / "venv"
KiB, MiB = 1024, 1 << 20
MB = 1_000_000
WRITE_CHUNK = MiB  # client message size for large writes (every target gets the same)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
QUICK = os.environ.get("BENCH_CAS_QUICK") == "1"  # a short trial run: fewer rounds, no 1 GB
SMALL_ROUNDS = 2 if QUICK else 7
LARGE_100MB_ROUNDS = 1 if QUICK else 3
LARGE_1GB_ROUNDS = 0 if QUICK else 1
SEQ_CALLS = 200
CONC_CALLS = {4: 400, 16: 800}


def log(message: str) -> None:
    print(f"[bench.cas {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------- targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_peak_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_rss_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Target:
    name: str
    address: str
    pid: int
    stop: Callable[[], None]


def start_ours(work: Path, name: str, durability: str) -> Target:
    config = {
        "execution": {"enabled": False},
        "storage": {"max_bytes": 8 << 30, "durability": durability},
    }
    service = ServiceProcess(work / name, config)
    return Target(name, service.address, service.process.pid, service.stop)


def _wait_for_port(address: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + 120
    host, port = address.rsplit(":", 1)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{address} exited:\n{log_file.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {address}:\n{log_file.read_text()[-3000:]}")


def _stopper(process: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    return stop


def start_buildgrid(work: Path) -> Target:
    """BuildGrid 0.9.1 with only its CAS and ByteStream services on an in-memory LRU store
    (no PostgreSQL needed for those), in its own venv (deploy/local/install-buildgrid.sh)."""
    subprocess.run(
        [str(REPO / "deploy/local/install-buildgrid.sh"), str(BUILDGRID_VENV)], check=True
    )
    port = free_port()
    directory = work / "buildgrid"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "buildgrid.yml"
    config.write_text(
        f"""server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
storages:
  - !lru-storage &cas-storage
    size: 6144M
instances:
  - name: ''
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
thread-pool-size: 32
grpc-server-options:
  grpc.max_receive_message_length: 67108864
  grpc.max_send_message_length: 67108864
"""
    )
    log_file = directory / "buildgrid.log"
    process = subprocess.Popen(
        [str(BUILDGRID_VENV / "bin/bgd"), "server", "start", str(config)],
        stdout=open(log_file, "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    _wait_for_port(address, process, log_file)
    return Target("buildgrid", address, process.pid, _stopper(process))


def start_ceiling(work: Path) -> Target:
    port = free_port()
    log_file = work / "ceiling.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cas_ceiling", str(port)],
        stdout=open(log_file, "w"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    address = f"127.0.0.1:{port}"
    _wait_for_port(address, process, log_file)
    return Target("ceiling", address, process.pid, _stopper(process))


# ------------------------------------------------------------------------------- client


def digest_of(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def small_blobs(n: int, size: int = KiB) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def batch_update_request(blobs: list[bytes]) -> re_pb2.BatchUpdateBlobsRequest:
    return re_pb2.BatchUpdateBlobsRequest(
        requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in blobs
        ]
    )


class Client:
    """One target, through one grpc.aio channel."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target.address, options=CHANNEL_OPTIONS)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(None)

    async def batch_update(self, request: re_pb2.BatchUpdateBlobsRequest) -> None:
        response = await self.cas.BatchUpdateBlobs(request)
        bad = [r.status for r in response.responses if r.status.code != 0]
        if bad or len(response.responses) != len(request.requests):
            raise RuntimeError(f"{self.target.name}: BatchUpdateBlobs failed: {bad[:3]}")

    async def batch_read(self, request: re_pb2.BatchReadBlobsRequest) -> None:
        response = await self.cas.BatchReadBlobs(request)
        sizes = [len(r.data) for r in response.responses if r.status.code == 0]
        if sizes != [d.size_bytes for d in request.digests]:
            raise RuntimeError(f"{self.target.name}: BatchReadBlobs returned short")

    async def find_missing(self, request: re_pb2.FindMissingBlobsRequest) -> None:
        await self.cas.FindMissingBlobs(request)

    async def write(
        self, digest: re_pb2.Digest, chunks: Callable[[], AsyncIterator[bytes]]
    ) -> None:
        name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

        async def requests() -> AsyncIterator[bs_pb2.WriteRequest]:
            offset = 0
            async for data in chunks():
                last = offset + len(data) >= digest.size_bytes
                yield bs_pb2.WriteRequest(
                    resource_name=name if offset == 0 else "",
                    write_offset=offset,
                    data=data,
                    finish_write=last,
                )
                offset += len(data)

        response = await self.bytestream.Write(requests())
        if response.committed_size != digest.size_bytes:
            raise RuntimeError(f"{self.target.name}: Write committed {response.committed_size}")

    async def write_small(self, data: bytes) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data

        await self.write(digest_of(data), one)

    async def read(self, digest: re_pb2.Digest) -> int:
        got = 0
        request = bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")
        async for response in self.bytestream.Read(request):
            got += len(response.data)
        if got != digest.size_bytes:
            raise RuntimeError(f"{self.target.name}: Read got {got} of {digest.size_bytes}")
        return got


async def timed(call: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


async def calls_per_second(
    concurrency: int, items: list[Any], call: Callable[[Any], Awaitable[Any]]
) -> float:
    """Runs call(item) for every item, `concurrency` at a time; calls per second."""
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            await call(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(items) / (time.perf_counter() - started)


@dataclass
class LargeBlob:
    """A large blob made of one random MiB repeated (with a random first MiB, so every blob
    is new to every target), streamed without holding it in memory."""

    size: int
    first: bytes
    block: bytes
    digest: re_pb2.Digest

    @classmethod
    def make(cls, size: int) -> LargeBlob:
        first, block = os.urandom(WRITE_CHUNK), os.urandom(WRITE_CHUNK)
        hasher = hashlib.sha256()
        blob = cls(size, first, block, re_pb2.Digest())
        for piece in blob.pieces():
            hasher.update(piece)
        blob.digest = re_pb2.Digest(hash=hasher.hexdigest(), size_bytes=size)
        return blob

    def pieces(self) -> list[bytes]:
        out: list[bytes] = []
        left = self.size
        while left > 0:
            piece = self.first if not out else self.block
            out.append(piece if left >= len(piece) else piece[:left])
            left -= len(out[-1])
        return out

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces():
            yield piece


# ------------------------------------------------------------------------------- figures


Samples = dict[str, dict[str, list[float]]]  # figure -> target -> samples


def add(samples: Samples, figure: str, target: str, value: float) -> None:
    samples.setdefault(figure, {}).setdefault(target, []).append(value)


async def small_round(clients: list[Client], samples: Samples, round_: int) -> None:
    order = clients if round_ % 2 == 0 else list(reversed(clients))
    for client in order:
        name = client.target.name
        # Requests are built before the clock starts: the figures time the calls alone.
        blobs = small_blobs(1000)
        update = batch_update_request(blobs)
        add(samples, "batch_update_ms", name, 1000 * await timed(client.batch_update(update)))
        digests = [digest_of(b) for b in blobs]
        read = re_pb2.BatchReadBlobsRequest(digests=digests)
        add(samples, "batch_read_ms", name, 1000 * await timed(client.batch_read(read)))
        probe = digests * 10  # 10,000 digests, the stored ones and as many again unknown
        probe[1::2] = [digest_of(os.urandom(32)) for _ in range(len(probe) // 2)]
        find = re_pb2.FindMissingBlobsRequest(blob_digests=probe)
        add(samples, "find_missing_10k_ms", name, 1000 * await timed(client.find_missing(find)))
        for concurrency, count in [(1, SEQ_CALLS), *CONC_CALLS.items()]:
            fresh = small_blobs(count)
            rate = await calls_per_second(concurrency, fresh, client.write_small)
            add(samples, f"bs_write_1KiB_c{concurrency}_per_s", name, rate)
            stored = [digest_of(b) for b in fresh]
            rate = await calls_per_second(concurrency, stored, client.read)
            add(samples, f"bs_read_1KiB_c{concurrency}_per_s", name, rate)


def machine_floor(directory: Path, blob: LargeBlob, samples: Samples, label: str) -> None:
    """What the machine itself gives, in the same round as the targets: a new file of the
    blob's size written with 1 MiB pwrites (on the filesystem our CAS uses), and SHA-256
    over the same bytes. A verified write cannot beat both at once; here new page-cache
    pages cost far more CPU than rewritten ones, so the first figure is the disk's."""
    path = directory / f"floor-{uuid.uuid4()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        started, offset = time.perf_counter(), 0
        for piece in blob.pieces():
            os.pwrite(fd, piece, offset)
            offset += len(piece)
        add(samples, f"disk_write_{label}_MBps", "machine", blob.size / MB / elapsed(started))
    finally:
        os.close(fd)
        path.unlink()
    hasher, started = hashlib.sha256(), time.perf_counter()
    for piece in blob.pieces():
        hasher.update(piece)
    add(samples, f"sha256_{label}_MBps", "machine", blob.size / MB / elapsed(started))


def elapsed(started: float) -> float:
    return time.perf_counter() - started


async def large_round(
    clients: list[Client], samples: Samples, size: int, label: str, round_: int, work: Path
) -> dict[str, int]:
    """Write then read one new blob of `size` on every target; MB/s. Returns each target's
    peak RSS during its write and read."""
    peaks = {}
    order = clients if round_ % 2 == 0 else list(reversed(clients))
    blob = LargeBlob.make(size)
    machine_floor(work, blob, samples, label)
    for client in order:
        name = client.target.name
        reset_rss_peak(client.target.pid)
        seconds = await timed(client.write(blob.digest, blob.chunks))
        add(samples, f"bs_write_{label}_MBps", name, size / MB / seconds)
        seconds = await timed(client.read(blob.digest))
        add(samples, f"bs_read_{label}_MBps", name, size / MB / seconds)
        peaks[name] = rss_peak_bytes(client.target.pid)
    return peaks


async def measure(targets: list[Target], work: Path) -> dict[str, Any]:
    clients = [Client(t) for t in targets]
    samples: Samples = {}
    try:
        for client in clients:  # warm up channels and code paths
            await client.batch_update(batch_update_request(small_blobs(10)))
            await client.write_small(os.urandom(KiB))
        for round_ in range(SMALL_ROUNDS):
            log(f"small blobs, round {round_ + 1}/{SMALL_ROUNDS}")
            await small_round(clients, samples, round_)
        for round_ in range(LARGE_100MB_ROUNDS):
            log(f"100 MB streams, round {round_ + 1}/{LARGE_100MB_ROUNDS}")
            await large_round(clients, samples, 100 * MB, "100MB", round_, work)
        big = [c for c in clients if c.target.name != "ours_fsync"]
        peaks: dict[str, int] = {}
        for round_ in range(LARGE_1GB_ROUNDS):
            log(f"1 GB streams, round {round_ + 1}/{LARGE_1GB_ROUNDS}")
            peaks = await large_round(big, samples, 1000 * MB, "1GB", round_, work)
    finally:
        for client in clients:
            await client.close()
    return {"samples": samples, "rss_peak_1GB_bytes": peaks}


# ------------------------------------------------------------------------------- results

# figure, label, unit, True if more is better
FIGURES: list[tuple[str, str, str, bool]] = [
    ("batch_update_ms", "BatchUpdateBlobs, 1,000 x 1 KiB", "ms", False),
    ("batch_read_ms", "BatchReadBlobs, 1,000 x 1 KiB", "ms", False),
    ("find_missing_10k_ms", "FindMissingBlobs, 10,000 digests", "ms", False),
    ("bs_write_1KiB_c1_per_s", "ByteStream Write 1 KiB, sequential", "/s", True),
    ("bs_write_1KiB_c4_per_s", "ByteStream Write 1 KiB, 4 concurrent", "/s", True),
    ("bs_write_1KiB_c16_per_s", "ByteStream Write 1 KiB, 16 concurrent", "/s", True),
    ("bs_read_1KiB_c1_per_s", "ByteStream Read 1 KiB, sequential", "/s", True),
    ("bs_read_1KiB_c4_per_s", "ByteStream Read 1 KiB, 4 concurrent", "/s", True),
    ("bs_read_1KiB_c16_per_s", "ByteStream Read 1 KiB, 16 concurrent", "/s", True),
    ("bs_write_100MB_MBps", "ByteStream Write 100 MB", "MB/s", True),
    ("bs_read_100MB_MBps", "ByteStream Read 100 MB", "MB/s", True),
    ("bs_write_1GB_MBps", "ByteStream Write 1 GB", "MB/s", True),
    ("bs_read_1GB_MBps", "ByteStream Read 1 GB", "MB/s", True),
]
TARGETS = ["ours", "ours_fsync", "buildgrid", "ceiling"]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, dict[str, float]] = {}
    for figure, by_target in raw["samples"].items():
        figures[figure] = {t: statistics.median(v) for t, v in by_target.items()}
    ratios: dict[str, dict[str, float]] = {}
    for figure, _, _, more_is_better in FIGURES:
        values = figures.get(figure, {})
        if "ours" not in values:
            continue
        entry = {}
        for other in ("buildgrid", "ceiling", "ours_fsync"):
            if other in values and values[other] and values["ours"]:
                # > 1 means ours is better (faster) than the other.
                entry[f"ours_vs_{other}"] = (
                    values["ours"] / values[other]
                    if more_is_better
                    else values[other] / values["ours"]
                )
        ratios[figure] = entry
    return {"figures": figures, "ratios": ratios, "samples": raw["samples"]}


def run(work: Path) -> dict[str, Any]:
    """Starts every target under `work`, measures, stops them; the figures and ratios."""
    work.mkdir(parents=True, exist_ok=True)
    targets: list[Target] = []
    started = time.monotonic()
    try:
        log("starting targets")
        targets.append(start_ours(work, "ours", "none"))
        targets.append(start_ours(work, "ours_fsync", "fsync"))
        targets.append(start_buildgrid(work))
        targets.append(start_ceiling(work))
        raw = asyncio.run(measure(targets, work))
    finally:
        for target in targets:
            target.stop()
    results = summarize(raw)
    results["rss_peak_1GB_bytes"] = raw["rss_peak_1GB_bytes"]
    results["load_average_1min"] = os.getloadavg()[0]
    results["cores"] = os.cpu_count()
    results["duration_s"] = round(time.monotonic() - started)
    results["client"] = (
        f"grpc.aio in one process, {WRITE_CHUNK // MiB} MiB write messages; "
        f"small blobs: median of {SMALL_ROUNDS} interleaved rounds, 100 MB: "
        f"{LARGE_100MB_ROUNDS}, 1 GB: {LARGE_1GB_ROUNDS}"
    )
    return results


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:,.0f} {unit}"


def markdown(results: dict[str, Any]) -> str:
    """The README table: each figure for every target, and ours against BuildGrid and the
    ceiling (x > 1: ours is faster)."""
    figures = results["figures"]
    ratios = results["ratios"]
    lines = [
        "| | ours (disk) | ours, `durability: fsync` | BuildGrid 0.9.1 (memory) "
        "| bare grpc.aio (stores nothing) | ours / BuildGrid | ours / bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for figure, label, unit, _ in FIGURES:
        values = figures.get(figure, {})
        if not values:
            continue
        cells = [_cell(values.get(t), unit) for t in TARGETS]
        r = ratios.get(figure, {})
        vs_bg = f"{r['ours_vs_buildgrid']:.2f}x" if "ours_vs_buildgrid" in r else "–"
        vs_ceiling = f"{r['ours_vs_ceiling']:.2f}" if "ours_vs_ceiling" in r else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {vs_bg} | {vs_ceiling} |")
    floor = [
        f"{label}: a new file {disk:,.0f} MB/s, SHA-256 {sha:,.0f} MB/s"
        for label in ("100MB", "1GB")
        if (disk := figures.get(f"disk_write_{label}_MBps", {}).get("machine"))
        and (sha := figures.get(f"sha256_{label}_MBps", {}).get("machine"))
    ]
    if floor:
        lines.append("")
        lines.append(
            "The machine in the same rounds (1 MiB pwrites on the CAS's filesystem; hashing "
            "in one thread): " + "; ".join(floor) + "."
        )
    peaks = results.get("rss_peak_1GB_bytes", {})
    if peaks:
        lines.append("")
        lines.append(
            "Peak RSS while writing and reading the 1 GB blob: "
            + ", ".join(f"{name} {value / MiB:,.0f} MiB" for name, value in peaks.items())
            + "."
        )
    lines.append("")
    lines.append(
        f"{results.get('cores')} cores, 1-minute load average "
        f"{results.get('load_average_1min'):.1f} "
        f"at the end (a shared machine: absolute figures are noisy, the ratios within one run "
        f"are what compares). Client: {results.get('client')}."
    )
    return "\n".join(lines)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-cas-"))
    try:
        results = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cas.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(markdown(results))
    print(f"written: {RESULTS / 'cas.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
