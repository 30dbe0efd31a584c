"""The one place that imports the generated Remote Workers API (v1test2) modules."""

from google.devtools.remoteworkers.v1test2 import bots_pb2 as bots_pb2
from google.devtools.remoteworkers.v1test2 import bots_pb2_grpc as bots_grpc
from google.devtools.remoteworkers.v1test2 import worker_pb2 as worker_pb2

__all__ = ["bots_grpc", "bots_pb2", "worker_pb2"]
