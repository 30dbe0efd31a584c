"""Scale-out fixtures: one PostgreSQL + BuildGrid for the whole session (start-up costs ~10-30 s),
and workers started per test as `sidecar-executor worker` subprocesses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.images import IMAGE_A, IMAGE_B
from tests.scaleout.services import (
    BuildGrid,
    SetupError,
    WorkerProcess,
    remove_sidecars_of,
    worker_config,
)

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(scope="session")
def buildgrid(test_images: None) -> Iterator[BuildGrid]:
    """Never skipped: a machine that cannot run BuildGrid fails these tests, saying why."""
    try:
        grid = BuildGrid()
    except SetupError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        grid.start()
    except SetupError as error:
        grid.stop()
        pytest.fail(str(error), pytrace=False)
    yield grid
    grid.stop()


@pytest.fixture
def start_worker(buildgrid: BuildGrid, tmp_path: Path) -> Iterator[StartWorker]:
    """start_worker(name, images=[A, B], capacity=2, *extra_args) -> a running worker; every
    worker is stopped (SIGTERM) at the end, and the sidecars of killed ones removed."""
    started: list[WorkerProcess] = []

    def start(
        name: str,
        images: list[str] | None = None,
        capacity: int = 2,
        *extra: str,
        data_dir: Path | None = None,
        grace_s: float = 20,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            buildgrid.url,
            data_dir or tmp_path / name,
            worker_config(
                f"{name}-{tmp_path.name}", images or [IMAGE_A, IMAGE_B], capacity, grace_s
            ),
            *extra,
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        assert worker.process is not None
        if worker.process.poll() is None:
            worker.terminate()
        if (worker.data_dir / "worker-id").exists():
            remove_sidecars_of(worker.worker_id)
