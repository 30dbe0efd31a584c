"""Capabilities: what this server supports, so clients can adapt before sending anything."""

from __future__ import annotations

from typing import Any

import grpc

from worker.reapi import re_grpc, re_pb2, semver_pb2
from worker.server.rpc_errors import rpc_errors

Context = grpc.aio.ServicerContext[Any, Any]

# v2.0 through v2.2: Action.platform (2.2) and output_paths (2.1) are honoured.
LOW_API_VERSION = semver_pb2.SemVer(major=2, minor=0)
HIGH_API_VERSION = semver_pb2.SemVer(major=2, minor=2)


def server_capabilities(
    max_batch_total_size_bytes: int, execution_enabled: bool
) -> re_pb2.ServerCapabilities:
    sha256 = re_pb2.DigestFunction.SHA256
    capabilities = re_pb2.ServerCapabilities(
        cache_capabilities=re_pb2.CacheCapabilities(
            digest_function=[sha256],
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                update_enabled=True
            ),
            max_batch_total_size_bytes=max_batch_total_size_bytes,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
        ),
        low_api_version=LOW_API_VERSION,
        high_api_version=HIGH_API_VERSION,
    )
    if execution_enabled:
        capabilities.execution_capabilities.CopyFrom(
            re_pb2.ExecutionCapabilities(
                digest_function=sha256,
                exec_enabled=True,
                execution_priority_capabilities=re_pb2.PriorityCapabilities(
                    priorities=[
                        re_pb2.PriorityCapabilities.PriorityRange(
                            min_priority=-1000, max_priority=1000
                        )
                    ]
                ),
            )
        )
    return capabilities


class CapabilitiesServicer(re_grpc.CapabilitiesServicer):
    def __init__(self, capabilities: re_pb2.ServerCapabilities) -> None:
        self._capabilities = capabilities

    @rpc_errors
    async def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: Context
    ) -> re_pb2.ServerCapabilities:
        return self._capabilities
