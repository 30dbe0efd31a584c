"""A sidecar creation whose answer is lost (the daemon made the container, then went away)
leaves no container behind once the daemon answers again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.deploy.daemon_proxy import DaemonProxy
from tests.images import IMAGE_A
from worker.runtime.docker import DockerRuntime
from worker.runtime.protocol import RuntimeUnavailable, SidecarSpec

pytestmark = pytest.mark.docker

TEST_LABEL = "sidecar-executor-test.lost-creation"


@pytest.fixture
def host() -> Iterator[docker.APIClient]:
    client = docker.APIClient(version="auto")
    yield client
    client.close()


def test_a_container_whose_creation_answer_was_lost_is_removed_later(
    tmp_path: Path, test_images: None, host: docker.APIClient
) -> None:
    mark = uuid.uuid4().hex
    proxy = DaemonProxy(tmp_path / "docker.sock")
    proxy.up()
    runtime = DockerRuntime(proxy.url, timeout_s=30)
    ours = {"label": f"{TEST_LABEL}={mark}"}
    try:
        runtime.ping()
        proxy.lose_answers_to = b"/containers/create"
        spec = SidecarSpec(
            image_id=IMAGE_A,
            entrypoint=["sleep"],
            command=["60"],
            mounts=[],
            labels={TEST_LABEL: mark},
        )
        with pytest.raises(RuntimeUnavailable):
            runtime.create_sidecar(spec)
        assert len(host.containers(all=True, filters=ours)) == 1, "the daemon made it"

        proxy.lose_answers_to = None
        runtime.ping()  # the daemon answers again: failed creations are swept
        assert host.containers(all=True, filters=ours) == []
    finally:
        runtime.close()
        proxy.down()
        for left in host.containers(all=True, filters=ours):
            host.remove_container(left["Id"], force=True)
