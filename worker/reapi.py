"""The one place that imports the generated protobuf and gRPC modules (built into gen/ by make)."""

from build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from build.bazel.semver import semver_pb2
from google.bytestream import bytestream_pb2 as bs_pb2
from google.bytestream import bytestream_pb2_grpc as bs_grpc
from google.longrunning import operations_pb2 as ops_pb2
from google.longrunning import operations_pb2_grpc as ops_grpc
from google.rpc import error_details_pb2, status_pb2
from sidecar_executor.admin.v1 import admin_pb2, admin_pb2_grpc

__all__ = [
    "admin_pb2",
    "admin_pb2_grpc",
    "bs_grpc",
    "bs_pb2",
    "error_details_pb2",
    "ops_grpc",
    "ops_pb2",
    "re_grpc",
    "re_pb2",
    "semver_pb2",
    "status_pb2",
]
