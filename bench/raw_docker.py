"""The baselines, straight through the Engine API (docker-py), with no service in between."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker

from bench.concurrency import items_per_second

LABEL = {"sidecar-executor.bench": "baseline"}


def start_sleeper(api: docker.APIClient, image: str) -> str:
    """A running container of `image` that only sleeps, as a sidecar would."""
    created = api.create_container(
        image,
        command=["sleep", "1000000"],
        labels=LABEL,
        host_config=api.create_host_config(network_mode="none", init=True),
        network_disabled=True,
    )
    api.start(created["Id"])
    return str(created["Id"])


@contextmanager
def warm_containers(image: str, count: int) -> Iterator[list[str]]:
    """`count` running containers of `image` that just sleep, removed afterwards."""
    api = docker.APIClient(version="auto")
    ids: list[str] = []
    try:
        ids.extend(start_sleeper(api, image) for _ in range(count))
        yield ids
    finally:
        for container_id in ids:
            api.remove_container(container_id, force=True)
        api.close()


def exec_true(api: docker.APIClient, container_id: str) -> None:
    """A raw `docker exec true`: create, start (attached, so it returns when done), inspect."""
    created = api.exec_create(container_id, ["true"], stdout=True, stderr=True)
    api.exec_start(created["Id"])
    state = api.exec_inspect(created["Id"])
    assert state["ExitCode"] == 0, state


def exec_latencies(container_id: str, runs: int, warmup: bool = True) -> list[float]:
    api = docker.APIClient(version="auto")
    try:
        if warmup:
            exec_true(api, container_id)
        latencies = []
        for _ in range(runs):
            began = time.perf_counter()
            exec_true(api, container_id)
            latencies.append(time.perf_counter() - began)
        return latencies
    finally:
        api.close()


def container_per_action_latencies(image: str, runs: int) -> list[float]:
    """The raw cost of a container per action: create, start, exec `true`, remove."""
    api = docker.APIClient(version="auto")
    try:
        latencies = []
        for _ in range(runs):
            began = time.perf_counter()
            container_id = start_sleeper(api, image)
            exec_true(api, container_id)
            api.remove_container(container_id, force=True)
            latencies.append(time.perf_counter() - began)
        return latencies
    finally:
        api.close()


def exec_throughput(container_ids: list[str], total: int) -> float:
    """Execs per second with one client thread per container, `total` execs in all; each
    thread's client is made (and has asked the daemon its version) before the clock starts."""
    clients = [docker.APIClient(version="auto") for _ in container_ids]
    try:
        return items_per_second(
            range(total),
            list(zip(clients, container_ids, strict=True)),
            lambda client, _: exec_true(*client),
        )
    finally:
        for api in clients:
            api.close()


def copy_tree_into_container(container_id: str, files: dict[str, bytes], target: str) -> float:
    """What a container-per-action executor does for inputs: tar the tree, PUT it into the
    container. Returns seconds."""
    api = docker.APIClient(version="auto")
    try:
        began = time.perf_counter()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path, data in files.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(data))
        api.exec_start(api.exec_create(container_id, ["mkdir", "-p", target])["Id"])
        assert api.put_archive(container_id, target, buffer.getvalue())
        elapsed = time.perf_counter() - began
        api.exec_start(api.exec_create(container_id, ["rm", "-rf", target])["Id"])
        return elapsed
    finally:
        api.close()


def read_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
