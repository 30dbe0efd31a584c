"""Execution against the real Docker daemon: images, pools, outputs, environment, caching."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.concurrently import run_concurrently
from tests.execution_client import (
    ActionSpec,
    InputFile,
    execute,
    read_blob,
    run,
    shell_action,
    stderr_of,
    stdout_of,
    upload_action,
)
from tests.images import IMAGE_A, IMAGE_B, NO_SHELL
from tests.serving import RunningService, running_service
from worker.config import Settings
from worker.digests import Digest
from worker.execution.operations import Stage
from worker.reapi import re_grpc, re_pb2

pytestmark = pytest.mark.docker

A = {"container-image": f"docker://{IMAGE_A}"}
B = {"container-image": f"docker://{IMAGE_B}"}


def sh(script: str, **fields: object) -> ActionSpec:
    return shell_action(script, IMAGE_A, **fields)


def test_two_images_alternate_through_their_own_pools(exec_service: RunningService) -> None:
    seen = []
    for image in (A, B, A, B, A, B):
        response = run(exec_service.channel, sh("cat /etc/image-name", action_platform=image))
        assert response.status.code == 0
        seen.append(stdout_of(exec_service.channel, response).decode().strip())
    assert seen == ["image-a", "image-b"] * 3
    execution = exec_service.service.execution
    assert execution is not None
    pools = {p.key.image_id: p for p in execution.pools.pools}
    assert len(pools) == 2
    for pool in pools.values():
        assert pool.stats.created == 1  # warm reuse: one container per image for six actions
        assert pool.stats.leases == 3


def test_image_without_a_shell_runs_its_binary(exec_service: RunningService) -> None:
    spec = ActionSpec(
        argv=["/tool", "write", "out/result.txt", "made", "without", "a", "shell"],
        output_paths=["out/result.txt"],
        action_platform={"container-image": NO_SHELL},
    )
    response = run(exec_service.channel, spec)
    assert (response.status.code, response.result.exit_code) == (0, 0)
    assert stdout_of(exec_service.channel, response) == b"wrote out/result.txt\n"
    (output,) = response.result.output_files
    assert read_blob(exec_service.channel, output.digest) == b"made without a shell\n"


def test_non_zero_exit_is_an_ok_result_and_is_not_cached(exec_service: RunningService) -> None:
    spec = sh("echo failing >&2; exit 3")
    action = upload_action(exec_service.channel, spec)
    response = execute(exec_service.channel, action, skip_cache_lookup=False).response
    assert (response.status.code, response.result.exit_code) == (0, 3)
    assert stderr_of(exec_service.channel, response) == b"failing\n"
    with pytest.raises(grpc.RpcError) as caught:
        re_grpc.ActionCacheStub(exec_service.channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=action.to_proto())
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_successful_result_is_cached_and_skip_cache_lookup_runs_again(
    exec_service: RunningService,
) -> None:
    spec = sh("cat /proc/sys/kernel/random/uuid")
    action = upload_action(exec_service.channel, spec)
    first = execute(exec_service.channel, action, skip_cache_lookup=False)
    assert not first.response.cached_result
    assert first.stages[0] == Stage.QUEUED and Stage.EXECUTING in first.stages
    assert first.stages[-1] == Stage.COMPLETED
    cached = execute(exec_service.channel, action, skip_cache_lookup=False).response
    assert cached.cached_result
    assert stdout_of(exec_service.channel, cached) == stdout_of(
        exec_service.channel, first.response
    )
    fresh = execute(exec_service.channel, action, skip_cache_lookup=True).response
    assert not fresh.cached_result
    assert stdout_of(exec_service.channel, fresh) != stdout_of(exec_service.channel, cached)


def test_do_not_cache_is_honoured(exec_service: RunningService) -> None:
    action = upload_action(exec_service.channel, sh("true", do_not_cache=True))
    assert execute(exec_service.channel, action, skip_cache_lookup=False).response.status.code == 0
    second = execute(exec_service.channel, action, skip_cache_lookup=False).response
    assert not second.cached_result


def test_outputs_files_directories_symlinks_and_executable_bits(
    exec_service: RunningService,
) -> None:
    script = (
        "mkdir -p out/dir/sub && echo plain > out/file.txt && "
        "printf '#!/bin/sh\\necho run\\n' > out/tool.sh && chmod 755 out/tool.sh && "
        "echo deep > out/dir/sub/deep.txt && echo top > out/dir/top.txt && "
        "chmod 755 out/dir/top.txt && ln -s sub/deep.txt out/dir/link && "
        "ln -s file.txt out/alias"
    )
    spec = sh(
        script,
        output_paths=["out/file.txt", "out/tool.sh", "out/dir", "out/alias", "out/absent"],
    )
    response = run(exec_service.channel, spec)
    assert response.status.code == 0, response.status
    result = response.result
    files = {f.path: f for f in result.output_files}
    assert set(files) == {"out/file.txt", "out/tool.sh"}
    assert not files["out/file.txt"].is_executable
    assert files["out/tool.sh"].is_executable
    assert read_blob(exec_service.channel, files["out/file.txt"].digest) == b"plain\n"
    assert [(s.path, s.target) for s in result.output_symlinks] == [("out/alias", "file.txt")]

    (directory,) = result.output_directories
    assert directory.path == "out/dir"
    tree = re_pb2.Tree.FromString(read_blob(exec_service.channel, directory.tree_digest))
    root = tree.root
    assert [(f.name, f.is_executable) for f in root.files] == [("top.txt", True)]
    assert [(s.name, s.target) for s in root.symlinks] == [("link", "sub/deep.txt")]
    assert [d.name for d in root.directories] == ["sub"]
    (sub,) = tree.children
    assert [f.name for f in sub.files] == ["deep.txt"]
    assert read_blob(exec_service.channel, sub.files[0].digest) == b"deep\n"
    assert Digest.from_proto(root.directories[0].digest) == Digest.of(sub.SerializeToString())


def test_deprecated_output_fields_are_used_when_output_paths_is_empty(
    exec_service: RunningService,
) -> None:
    spec = sh(
        "echo f > bin/f.txt && mkdir -p bin/d && echo x > bin/d/x && ln -s f.txt bin/l",
        output_files=["bin/f.txt", "bin/l"],
        output_directories=["bin/d"],
    )
    result = run(exec_service.channel, spec).result
    assert [f.path for f in result.output_files] == ["bin/f.txt"]
    assert [s.path for s in result.output_file_symlinks] == ["bin/l"]
    assert [d.path for d in result.output_directories] == ["bin/d"]


def test_inputs_are_staged_read_only_with_executables_0555(exec_service: RunningService) -> None:
    spec = sh(
        "stat -c '%a %n' src/data.txt src/run.sh; ./src/run.sh; readlink src/link",
        files={
            "src/data.txt": InputFile(b"data\n"),
            "src/run.sh": InputFile(b"#!/bin/sh\necho executed\n", executable=True),
        },
        symlinks={"src/link": "data.txt"},
    )
    response = run(exec_service.channel, spec)
    assert stdout_of(exec_service.channel, response) == (
        b"444 src/data.txt\n555 src/run.sh\nexecuted\ndata.txt\n"
    )


def test_environment_is_exactly_the_commands_on_top_of_the_images(
    exec_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_SECRET", "must-not-leak")
    spec = sh("env | sort", env={"GREETING": "hello", "PATH": "/bin"})
    lines = stdout_of(exec_service.channel, run(exec_service.channel, spec)).decode().splitlines()
    names = {line.split("=", 1)[0] for line in lines}
    assert "GREETING=hello" in lines
    assert "WORKER_SECRET" not in names
    home = next(line for line in lines if line.startswith("HOME=")).split("=", 1)[1]
    tmpdir = next(line for line in lines if line.startswith("TMPDIR=")).split("=", 1)[1]
    assert home.endswith("/home") and tmpdir.endswith("/tmp") and home != "/"
    assert names <= {"GREETING", "PATH", "HOME", "TMPDIR", "HOSTNAME", "PWD", "SHLVL"}


def test_working_directory_is_honoured(exec_service: RunningService) -> None:
    spec = sh(
        "pwd; cat here.txt; echo made > out.txt",
        files={"pkg/sub/here.txt": InputFile(b"inside\n")},
        working_directory="pkg/sub",
        output_paths=["out.txt"],
    )
    response = run(exec_service.channel, spec)
    out = stdout_of(exec_service.channel, response).decode().splitlines()
    assert out[0].endswith("/root/pkg/sub") and out[1] == "inside"
    assert [f.path for f in response.result.output_files] == ["out.txt"]


def test_metadata_carries_worker_and_ordered_timestamps(exec_service: RunningService) -> None:
    metadata = run(exec_service.channel, sh("true")).result.execution_metadata
    assert metadata.worker == exec_service.service.worker_name
    order = [
        metadata.queued_timestamp,
        metadata.worker_start_timestamp,
        metadata.input_fetch_start_timestamp,
        metadata.input_fetch_completed_timestamp,
        metadata.execution_start_timestamp,
        metadata.execution_completed_timestamp,
        metadata.output_upload_start_timestamp,
        metadata.output_upload_completed_timestamp,
        metadata.worker_completed_timestamp,
    ]
    times = [t.ToNanoseconds() for t in order]
    assert all(t > 0 for t in times)
    assert times == sorted(times)


def test_identical_actions_in_flight_execute_once(exec_service: RunningService) -> None:
    action = upload_action(
        exec_service.channel, sh("sleep 1; cat /proc/sys/kernel/random/uuid", do_not_cache=True)
    )
    results: list[bytes] = []

    def call() -> None:
        response = execute(exec_service.channel, action, skip_cache_lookup=True).response
        results.append(stdout_of(exec_service.channel, response))

    assert run_concurrently(call, threads=3) == []
    assert len(results) == 3 and len(set(results)) == 1


def test_sidecar_reuse_false_runs_in_a_fresh_container_each_time(
    exec_service: RunningService,
) -> None:
    spec = sh("cat /proc/sys/kernel/random/boot_id >/dev/null; hostname")
    spec.action_platform = {**A, "sidecar-reuse": "false"}
    hosts = {stdout_of(exec_service.channel, run(exec_service.channel, spec)) for _ in range(2)}
    assert len(hosts) == 2
    execution = exec_service.service.execution
    assert execution is not None
    assert execution.pools.pools == []  # no pool was made for these actions


def test_large_stdout_and_stderr_are_captured_whole(exec_service: RunningService) -> None:
    response = run(
        exec_service.channel,
        sh("head -c 10000000 /dev/zero | tr '\\0' o; head -c 3000000 /dev/zero | tr '\\0' e >&2"),
    )
    assert response.result.stdout_digest.size_bytes == 10_000_000
    assert response.result.stderr_digest.size_bytes == 3_000_000
    assert set(stdout_of(exec_service.channel, response)) == {ord("o")}


def test_several_actions_can_share_one_sidecar_when_configured(exec_settings: Settings) -> None:
    pool = exec_settings.execution.pool.model_copy(
        update={"actions_per_sidecar": 3, "max_sidecars": 1}
    )
    execution = exec_settings.execution.model_copy(update={"pool": pool})
    with running_service(exec_settings.model_copy(update={"execution": execution})) as service:
        actions = [
            upload_action(service.channel, sh(f"sleep 1; echo {i}", do_not_cache=True))
            for i in range(3)
        ]
        outputs: list[bytes] = []

        def one() -> None:
            action = actions.pop()
            outputs.append(stdout_of(service.channel, execute(service.channel, action).response))

        assert run(service.channel, sh("true")).status.code == 0  # the sidecar is up now
        began = time.monotonic()
        assert run_concurrently(one, threads=3) == []
        assert time.monotonic() - began < 2.9  # the three ran side by side, not one by one
        assert sorted(outputs) == [b"0\n", b"1\n", b"2\n"]
        execution_side = service.service.execution
        assert execution_side is not None
        (only,) = execution_side.pools.pools
        assert only.stats.created == 1


def test_a_timeout_in_a_shared_sidecar_leaves_its_neighbour_running(
    exec_settings: Settings,
) -> None:
    """With actions_per_sidecar > 1 the runner's whole-tree kill of a timed-out action is
    enough: the container is not removed under its neighbour, and the neighbour's scratch
    files are not scrubbed under it."""
    pool = exec_settings.execution.pool.model_copy(
        update={"actions_per_sidecar": 2, "max_sidecars": 1}
    )
    execution = exec_settings.execution.model_copy(update={"pool": pool})
    with running_service(exec_settings.model_copy(update={"execution": execution})) as service:
        neighbour = upload_action(
            service.channel,
            sh("echo mine > /tmp/neighbour; sleep 3; cat /tmp/neighbour", do_not_cache=True),
        )
        doomed = upload_action(service.channel, sh("sleep 60", timeout_s=1, do_not_cache=True))
        results: dict[str, re_pb2.ExecuteResponse] = {}
        jobs = [("neighbour", neighbour), ("doomed", doomed)]

        def one() -> None:
            name, action = jobs.pop()
            results[name] = execute(service.channel, action).response

        assert run_concurrently(one, threads=2) == []
        assert results["doomed"].status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert results["neighbour"].status.code == 0, results["neighbour"].status
        assert stdout_of(service.channel, results["neighbour"]) == b"mine\n"
