"""One lease end to end: read the Action from the payload, fetch its content from the scheduler's
CAS, run it with the executor `serve` uses, upload what it made, and say how it ended.

How it ended, as the lease's status (BuildGrid's reading of it in brackets):
- OK with the ActionResult (whatever the exit code) [completes the job];
- the REAPI status of an action problem: FAILED_PRECONDITION naming missing blobs, INVALID_ARGUMENT,
  PERMISSION_DENIED, DEADLINE_EXCEEDED with the partial result, ... [completes the job];
- UNAVAILABLE for a fault of this worker or the scheduler, not of the action: Docker daemon away,
  sidecar lost, CAS unreachable, an internal error [requeues the job for another try]."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import anyio
import grpc
from google.protobuf import any_pb2

from worker.bots.remote_cas import RemoteCas
from worker.bots.rwapi import bots_pb2
from worker.cas.disk_store import DiskBlobStore
from worker.config import ExecutionSettings
from worker.digests import Digest
from worker.errors import (
    Cancelled,
    InvalidArgument,
    ServiceError,
    Unavailable,
    to_status_proto,
)
from worker.execution.executor import ActionExecutor, load_message, now
from worker.execution.inputs import check_parsed_size
from worker.reapi import re_pb2, status_pb2

log = logging.getLogger(__name__)

OK = grpc.StatusCode.OK.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


def retryable(status: status_pb2.Status) -> status_pb2.Status:
    """INTERNAL from the executor means the sidecar or the worker failed, not the action: say
    UNAVAILABLE, so the scheduler runs the action again (elsewhere, maybe)."""
    if status.code != INTERNAL:
        return status
    return status_pb2.Status(code=UNAVAILABLE, message=status.message, details=status.details)


class LeaseRunner:
    def __init__(
        self,
        store: DiskBlobStore,
        remote: RemoteCas,
        executor: ActionExecutor,
        settings: ExecutionSettings,
        worker_name: str,
    ) -> None:
        self._store = store
        self._remote = remote
        self._executor = executor
        self._settings = settings
        self._worker = worker_name

    async def run(
        self,
        lease: bots_pb2.Lease,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
    ) -> bots_pb2.Lease:
        """The COMPLETED lease to report. Raises Cancelled if `cancelled` was set (the scheduler
        took the lease back): then nothing is reported."""
        metadata.worker = self._worker
        started = now()
        metadata.worker_start_timestamp.CopyFrom(started)
        result = re_pb2.ActionResult()
        try:
            digest = await self._action_digest(lease.payload)
            response = await self._execute(digest, metadata, cancelled)
            # The executor stamps its own start; the worker started with the lease.
            metadata.worker_start_timestamp.CopyFrom(started)
            result = response.result
            status = response.status
            if response.status.code == OK or _has_outputs(result):
                metadata.output_upload_start_timestamp.CopyFrom(now())
                await self._remote.upload_result(result)
                metadata.output_upload_completed_timestamp.CopyFrom(now())
        except Cancelled:
            raise
        except ServiceError as error:
            status = to_status_proto(error)
        except Exception as error:  # a bug: another worker may do better
            log.exception("lease %s failed unexpectedly", lease.id)
            status = to_status_proto(Unavailable(f"the worker failed: {error}"))
        if cancelled.is_set():
            raise Cancelled("the scheduler took the lease back")
        metadata.worker_completed_timestamp.CopyFrom(now())
        result.execution_metadata.CopyFrom(metadata)
        completed = bots_pb2.Lease(
            id=lease.id, state=bots_pb2.LeaseState.COMPLETED, status=retryable(status)
        )
        completed.result.Pack(result)
        return completed

    async def _action_digest(self, payload: any_pb2.Any) -> Digest:
        """The Action comes inline (its bytes go into the local CAS under their own digest) or as
        a Digest to fetch."""
        if payload.Is(re_pb2.Action.DESCRIPTOR):
            data = payload.value
            try:
                re_pb2.Action.FromString(data)
            except Exception as error:
                raise InvalidArgument("the lease's payload is not a valid Action") from error
            digest = Digest.of(data)
            await anyio.to_thread.run_sync(self._store.put, digest, data)
            return digest
        if payload.Is(re_pb2.Digest.DESCRIPTOR):
            proto = re_pb2.Digest()
            payload.Unpack(proto)
            digest = Digest.from_proto(proto)
            check_parsed_size(digest, "Action")
            await self._remote.fetch([digest])
            return digest
        raise InvalidArgument(
            f"the lease's payload is a {payload.type_url or 'nothing'}, not an Action or a Digest"
        )

    async def _execute(
        self,
        digest: Digest,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
    ) -> re_pb2.ExecuteResponse:
        action = await anyio.to_thread.run_sync(load_message, self._store, digest, re_pb2.Action)
        fetch_start = now()
        await _unless_cancelled(
            self._remote.fetch_action(
                action, self._settings.max_input_depth, self._settings.max_input_entries
            ),
            cancelled,
        )
        response, _ = await self._executor.execute(digest, metadata, cancelled)
        # The input fetch began with the download from the scheduler, before the executor's.
        metadata.input_fetch_start_timestamp.CopyFrom(fetch_start)
        return response


async def _unless_cancelled(fetch: Coroutine[Any, Any, None], cancelled: asyncio.Event) -> None:
    """Runs the input download, which a cancel of the lease stops at once (a large input
    would otherwise download to the end for nothing): Cancelled then. A download other
    leases wait for is taken over by one of them (RemoteCas marks it abandoned)."""
    download = asyncio.ensure_future(fetch)
    waiting = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({download, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        if not download.done():
            download.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await download  # its clean-up (temporary files, waiters) is done when this is
    if cancelled.is_set():
        if not download.cancelled() and download.exception() is not None:
            log.debug("input download of a cancelled lease ended: %s", download.exception())
        raise Cancelled("cancelled while its inputs were downloading")
    download.result()


def _has_outputs(result: re_pb2.ActionResult) -> bool:
    return bool(
        result.output_files
        or result.output_directories
        or result.output_symlinks
        or result.stdout_digest.hash
        or result.stderr_digest.hash
    )
