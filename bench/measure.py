"""Each figure of the benchmark, measured through the service's public gRPC interface."""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

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
    """Actions per second: `concurrency` client threads share `total` distinct no-op actions."""
    with channel(address) as ch:
        actions = [
            upload_action(ch, noop_spec(image, salt=f"{salt}-{i}".encode())) for i in range(total)
        ]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        with channel(address) as ch:
            while True:
                with lock:
                    if not actions:
                        return
                    action = actions.pop()
                try:
                    run_once(ch, action)
                except BaseException as error:
                    errors.append(error)
                    return

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return total / elapsed


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
