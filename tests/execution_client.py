"""Client-side helpers for execution tests: build and upload actions, run them, read results."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2

from tests.reapi_client import upload_batch, upload_message
from worker.digests import Digest
from worker.reapi import bs_grpc, bs_pb2, ops_pb2, re_grpc, re_pb2


@dataclass
class InputFile:
    data: bytes
    executable: bool = False


def upload_tree(
    channel: grpc.Channel, files: dict[str, InputFile], symlinks: dict[str, str]
) -> Digest:
    """Uploads an input root holding `files` and `symlinks` (relative paths)."""
    entries: dict[str, dict[str, object]] = {"": {}}
    for path in [*files, *symlinks]:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            entries.setdefault("/".join(parts[:depth]), {})
    if files:
        upload_batch(channel, *{f.data for f in files.values()})

    def build(prefix: str) -> re_pb2.Directory:
        directory = re_pb2.Directory()
        children = sorted(p for p in entries if p and p.rpartition("/")[0] == prefix)
        for child in children:
            digest = upload_message(channel, build(child))
            directory.directories.add(name=child.rpartition("/")[2], digest=digest.to_proto())
        for path in sorted(p for p in files if p.rpartition("/")[0] == prefix):
            directory.files.add(
                name=path.rpartition("/")[2],
                digest=Digest.of(files[path].data).to_proto(),
                is_executable=files[path].executable,
            )
        for path in sorted(p for p in symlinks if p.rpartition("/")[0] == prefix):
            directory.symlinks.add(name=path.rpartition("/")[2], target=symlinks[path])
        return directory

    return upload_message(channel, build(""))


@dataclass
class ActionSpec:
    argv: list[str]
    files: dict[str, InputFile] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    output_paths: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    output_directories: list[str] = field(default_factory=list)
    action_platform: dict[str, str] | None = None
    command_platform: dict[str, str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    working_directory: str = ""
    timeout_s: float | None = None
    do_not_cache: bool = False
    salt: bytes = b""


def shell_action(script: str, image: str, **fields: object) -> ActionSpec:
    """`sh -c script`, in `image` unless the fields give a platform of their own."""
    spec = ActionSpec(argv=["sh", "-c", script], **fields)  # type: ignore[arg-type]
    if spec.action_platform is None and spec.command_platform is None:
        spec.action_platform = {"container-image": f"docker://{image}"}
    return spec


def _platform(properties: dict[str, str] | None) -> re_pb2.Platform | None:
    if properties is None:
        return None
    return re_pb2.Platform(
        properties=[
            re_pb2.Platform.Property(name=k, value=v) for k, v in sorted(properties.items())
        ]
    )


def upload_action(channel: grpc.Channel, spec: ActionSpec) -> Digest:
    command = re_pb2.Command(
        arguments=spec.argv,
        environment_variables=[
            re_pb2.Command.EnvironmentVariable(name=k, value=v) for k, v in sorted(spec.env.items())
        ],
        output_paths=spec.output_paths,
        output_files=spec.output_files,
        output_directories=spec.output_directories,
        working_directory=spec.working_directory,
    )
    command_platform = _platform(spec.command_platform)
    if command_platform is not None:
        command.platform.CopyFrom(command_platform)
    action = re_pb2.Action(
        command_digest=upload_message(channel, command).to_proto(),
        input_root_digest=upload_tree(channel, spec.files, spec.symlinks).to_proto(),
        do_not_cache=spec.do_not_cache,
        salt=spec.salt,
    )
    action_platform = _platform(spec.action_platform)
    if action_platform is not None:
        action.platform.CopyFrom(action_platform)
    if spec.timeout_s is not None:
        action.timeout.CopyFrom(
            duration_pb2.Duration(
                seconds=int(spec.timeout_s), nanos=int((spec.timeout_s % 1) * 1e9)
            )
        )
    return upload_message(channel, action)


@dataclass
class Execution:
    operations: list[ops_pb2.Operation]

    @property
    def final(self) -> ops_pb2.Operation:
        return self.operations[-1]

    @property
    def response(self) -> re_pb2.ExecuteResponse:
        response = re_pb2.ExecuteResponse()
        assert self.final.done and self.final.HasField("response"), self.final
        self.final.response.Unpack(response)
        return response

    @property
    def stages(self) -> list[int]:
        return [stage_of(operation) for operation in self.operations]


def response_of(operation: ops_pb2.Operation) -> re_pb2.ExecuteResponse:
    """The ExecuteResponse of a finished operation; errors of the execution are in its
    status, never in Operation.error (REAPI: "errors ... should be returned in the
    ExecuteResponse status")."""
    assert operation.done and operation.HasField("response"), operation
    response = re_pb2.ExecuteResponse()
    operation.response.Unpack(response)
    return response


def stage_of(operation: ops_pb2.Operation) -> int:
    metadata = re_pb2.ExecuteOperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata.stage


def start_execute(channel: grpc.Channel, action_digest: Digest, timeout_s: float = 120) -> Any:
    """An Execute stream (skipping the cache) that the caller reads and may cancel."""
    return re_grpc.ExecutionStub(channel).Execute(
        re_pb2.ExecuteRequest(action_digest=action_digest.to_proto(), skip_cache_lookup=True),
        timeout=timeout_s,
    )


def follow(stream: Iterable[ops_pb2.Operation]) -> Execution:
    return Execution(list(stream))


def execute(
    channel: grpc.Channel,
    action_digest: Digest,
    skip_cache_lookup: bool = True,
    timeout_s: float = 120,
) -> Execution:
    stream = re_grpc.ExecutionStub(channel).Execute(
        re_pb2.ExecuteRequest(
            action_digest=action_digest.to_proto(), skip_cache_lookup=skip_cache_lookup
        ),
        timeout=timeout_s,
    )
    return follow(stream)


def run(
    channel: grpc.Channel, spec: ActionSpec, skip_cache_lookup: bool = True
) -> re_pb2.ExecuteResponse:
    return execute(channel, upload_action(channel, spec), skip_cache_lookup).response


def read_blob(channel: grpc.Channel, digest: re_pb2.Digest) -> bytes:
    request = bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")
    return b"".join(r.data for r in bs_grpc.ByteStreamStub(channel).Read(request))


def stdout_of(channel: grpc.Channel, response: re_pb2.ExecuteResponse) -> bytes:
    return read_blob(channel, response.result.stdout_digest)


def stderr_of(channel: grpc.Channel, response: re_pb2.ExecuteResponse) -> bytes:
    return read_blob(channel, response.result.stderr_digest)
