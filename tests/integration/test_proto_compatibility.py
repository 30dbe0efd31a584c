"""Our .proto files against the published ones Debian ships (bazel-bootstrap-source).

Both are compiled at test time in a temporary directory; every message, field (name,
number, type, label, type name), enum value and RPC of the reference must be in ours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REFERENCE = Path("/usr/src/bazel-bootstrap/third_party")
OURS = Path(__file__).resolve().parents[2] / "protos"

# (file, whether every message of the reference file must exist in ours)
FILES = [
    ("build/bazel/remote/execution/v2/remote_execution.proto", True),
    ("build/bazel/semver/semver.proto", True),
    ("google/bytestream/bytestream.proto", True),
    ("google/longrunning/operations.proto", True),
    ("google/rpc/status.proto", True),
    ("google/rpc/error_details.proto", False),  # we declare only the details we send
]

pytestmark = pytest.mark.skipif(
    not REFERENCE.is_dir(), reason="needs Debian's bazel-bootstrap-source (make test installs it)"
)


def compile_set(includes: list[Path], files: list[str], out: Path) -> dict[str, object]:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *(f"-I{p}" for p in [*includes, well_known]),
            f"--descriptor_set_out={out}",
            *files,
        ],
        check=True,
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f for f in fds.file}


def messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    found: dict[str, object] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = sorted(
            (
                f.name,
                f.number,
                f.type,
                f.label,
                f.type_name,
                f.oneof_index if f.HasField("oneof_index") else -1,
            )
            for f in message.field
        )
        for enum in message.enum_type:
            found[f"{name}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)
        for nested in message.nested_type:
            walk(name, nested)

    for message in file.message_type:
        walk(file.package, message)
    for enum in file.enum_type:
        found[f"{file.package}.{enum.name}"] = sorted((v.name, v.number) for v in enum.value)
    return found


def services(file: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    return {
        f"{file.package}.{s.name}": sorted(
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in s.method
        )
        for s in file.service
    }


@pytest.mark.parametrize(("path", "complete"), FILES)
def test_our_proto_is_wire_compatible_with_the_published_one(
    tmp_path: Path, path: str, complete: bool
) -> None:
    reference = compile_set(
        [REFERENCE / "remoteapis", REFERENCE / "googleapis"], [path], tmp_path / "ref.pb"
    )[path]
    ours = compile_set([OURS], [path], tmp_path / "ours.pb")[path]
    assert isinstance(reference, descriptor_pb2.FileDescriptorProto)
    assert isinstance(ours, descriptor_pb2.FileDescriptorProto)
    assert ours.package == reference.package

    ref_messages, our_messages = messages(reference), messages(ours)
    if complete:
        assert set(ref_messages) <= set(our_messages)
    assert our_messages, "no messages compiled"
    for name, fields in our_messages.items():
        assert name in ref_messages, f"{name} is not in the published API"
        assert fields == ref_messages[name], name
    assert services(ours) == services(reference)
