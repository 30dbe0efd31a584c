"""Executes one action end to end: load, resolve the platform, stage, run in a sidecar, collect."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
from google.protobuf import duration_pb2, timestamp_pb2

from worker.cas.disk_store import DiskBlobStore
from worker.config import ExecutionSettings
from worker.digests import EMPTY_DIGEST, Digest
from worker.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    to_status_proto,
)
from worker.execution.inputs import (
    DirectoryCache,
    check_relative_path,
    load_input_tree,
    prepare_output_parents,
    stage_input_root,
)
from worker.execution.outputs import OutputCollector
from worker.execution.platform import ExecutionPlatform, resolve_platform
from worker.execution.sidecar_run import RunOutcome, SidecarRun
from worker.pool.pools import SidecarPools
from worker.pool.sidecar_pool import PoolKey, Sidecar
from worker.reapi import re_pb2
from worker.runtime.protocol import (
    ContainerGone,
    ContainerNotRunning,
    ContainerRuntimeError,
    RuntimeUnavailable,
)

log = logging.getLogger(__name__)


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


M = TypeVar("M", re_pb2.Action, re_pb2.Command)


def load_message(store: DiskBlobStore, digest: Digest, kind: type[M]) -> M:
    try:
        data = store.read(digest)
    except NotFound:
        raise FailedPrecondition(
            f"{kind.__name__} {digest} is not in the CAS", missing=[digest.subject()]
        ) from None
    try:
        return kind.FromString(data)
    except Exception as error:
        raise InvalidArgument(f"blob {digest} is not a {kind.__name__} message") from error


def action_timeout_s(action: re_pb2.Action, settings: ExecutionSettings) -> float:
    if not action.HasField("timeout"):
        return settings.default_timeout_s
    timeout: duration_pb2.Duration = action.timeout
    seconds = timeout.seconds + timeout.nanos / 1e9
    if seconds <= 0:
        return settings.default_timeout_s
    if seconds > settings.max_timeout_s:
        raise InvalidArgument(
            f"action timeout {seconds:g} s exceeds this server's maximum of "
            f"{settings.max_timeout_s:g} s"
        )
    return seconds


def action_environment(command: re_pb2.Command, action_dir: Path) -> dict[str, str]:
    """Exactly the Command's variables (on top of the image's own, which Docker supplies), plus
    HOME and TMPDIR inside the action directory unless the Command sets them."""
    env = {"HOME": str(action_dir / "home"), "TMPDIR": str(action_dir / "tmp")}
    env.update((v.name, v.value) for v in command.environment_variables)
    return env


class ActionExecutor:
    def __init__(
        self,
        store: DiskBlobStore,
        pools: SidecarPools,
        sidecar_run: SidecarRun,
        settings: ExecutionSettings,
        worker_name: str,
        actions_dir: Path,
    ) -> None:
        self._store = store
        self._pools = pools
        self._sidecar_run = sidecar_run
        self._settings = settings
        self._worker = worker_name
        self._actions_dir = actions_dir
        self._directories = DirectoryCache(store)
        self._cleanups: set[asyncio.Task[None]] = set()

    async def execute(
        self,
        action_digest: Digest,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
    ) -> tuple[re_pb2.ExecuteResponse, re_pb2.Action | None]:
        """Never raises for problems of the action: they go in ExecuteResponse.status (with
        the partial result, if any). Raises Cancelled if the operation was cancelled."""
        metadata.worker = self._worker
        metadata.worker_start_timestamp.CopyFrom(now())
        response = re_pb2.ExecuteResponse()
        action: re_pb2.Action | None = None
        try:
            action = load_message(self._store, action_digest, re_pb2.Action)
            await self._execute(action, metadata, cancelled, response)
        except Cancelled:
            raise
        except ServiceError as error:
            response.status.CopyFrom(to_status_proto(error))
        metadata.worker_completed_timestamp.CopyFrom(now())
        response.result.execution_metadata.CopyFrom(metadata)
        return response, action

    async def _execute(
        self,
        action: re_pb2.Action,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
        response: re_pb2.ExecuteResponse,
    ) -> None:
        command = load_message(
            self._store, Digest.from_proto(action.command_digest), re_pb2.Command
        )
        if not command.arguments:
            raise InvalidArgument("the Command has no arguments")
        if command.working_directory:
            check_relative_path(command.working_directory, "working_directory")
        timeout_s = action_timeout_s(action, self._settings)
        platform = resolve_platform(action, command, self._settings)
        key = await self._pools.key_for(platform)  # pulls the image if needed

        action_dir = self._actions_dir / uuid.uuid4().hex
        try:
            metadata.input_fetch_start_timestamp.CopyFrom(now())
            working_dir = await anyio.to_thread.run_sync(
                self._stage, action, command, platform, action_dir
            )
            metadata.input_fetch_completed_timestamp.CopyFrom(now())
            if cancelled.is_set():
                raise Cancelled("cancelled before it ran")

            metadata.execution_start_timestamp.CopyFrom(now())
            outcome = await self._run(
                platform, key, action_dir, working_dir, command, timeout_s, cancelled
            )
            metadata.execution_completed_timestamp.CopyFrom(now())

            metadata.output_upload_start_timestamp.CopyFrom(now())
            await anyio.to_thread.run_sync(
                self._collect, command, action_dir, working_dir, response.result
            )
            metadata.output_upload_completed_timestamp.CopyFrom(now())
        finally:
            self._remove_later(action_dir)
        self._judge(outcome, timeout_s, response)

    # ------------------------------------------------------------------ steps

    def _stage(
        self,
        action: re_pb2.Action,
        command: re_pb2.Command,
        platform: ExecutionPlatform,
        action_dir: Path,
    ) -> Path:
        tree = load_input_tree(
            self._directories, self._store, Digest.from_proto(action.input_root_digest)
        )
        uid, _, gid = platform.user.partition(":")
        owner = (int(uid), int(gid)) if os.geteuid() == 0 else None
        input_root = action_dir / "root"
        for directory in (action_dir, input_root, action_dir / "home", action_dir / "tmp"):
            directory.mkdir(parents=True)
            if owner is not None:
                os.chown(directory, *owner)
        stage_input_root(
            tree, self._store, input_root, copy_files=platform.runs_as_root, owner=owner
        )
        working_dir = input_root / command.working_directory
        working_dir.mkdir(parents=True, exist_ok=True)
        prepare_output_parents(command, working_dir, owner)
        return working_dir

    async def _run(
        self,
        platform: ExecutionPlatform,
        key: PoolKey,
        action_dir: Path,
        working_dir: Path,
        command: re_pb2.Command,
        timeout_s: float,
        cancelled: asyncio.Event,
    ) -> RunOutcome:
        """Runs the command in a leased (or, for sidecar-reuse=false, a fresh) sidecar. A sidecar
        found gone or stopped before the exec started is replaced once."""
        env = action_environment(command, action_dir)
        argv = list(command.arguments)
        pool = self._pools.pool_for(key, platform.image) if platform.reuse_sidecar else None
        lease: Callable[[], Awaitable[Sidecar]] = (
            pool.lease if pool is not None else functools.partial(self._pools.create, key)
        )
        attempts = 0
        while True:
            attempts += 1
            try:
                sidecar = await lease()
            except RuntimeUnavailable as error:
                raise Unavailable(f"cannot create a sidecar: {error}") from None
            except ContainerRuntimeError as error:
                raise FailedPrecondition(
                    f"cannot create a sidecar of {platform.image}: {error}"
                ) from None
            outcome: RunOutcome | None = None
            try:
                outcome = await self._sidecar_run.run(
                    sidecar, action_dir, working_dir, argv, env, platform.user, timeout_s, cancelled
                )
                return outcome
            except (ContainerGone, ContainerNotRunning) as error:
                log.warning("sidecar %s unusable (%s)", sidecar.short_id, error)
                if attempts == 2:
                    raise Unavailable(
                        f"sidecars of {platform.image} keep failing: {error}"
                    ) from None
            except RuntimeUnavailable as error:
                raise Unavailable(f"Docker daemon: {error}") from None
            finally:
                reusable = outcome is not None and outcome.sidecar_reusable
                if pool is not None:
                    await pool.release(sidecar, reusable=reusable)
                else:
                    await self._pools.destroy(sidecar)

    def _collect(
        self,
        command: re_pb2.Command,
        action_dir: Path,
        working_dir: Path,
        result: re_pb2.ActionResult,
    ) -> None:
        for stream in ("stdout", "stderr"):
            path = action_dir / stream
            try:
                empty = path.stat().st_size == 0
            except FileNotFoundError:
                empty = True
            digest = EMPTY_DIGEST if empty else self._store.ingest_file(path)
            getattr(result, f"{stream}_digest").CopyFrom(digest.to_proto())
        OutputCollector(self._store, action_dir / "root", working_dir).collect(command, result)

    @staticmethod
    def _judge(outcome: RunOutcome, timeout_s: float, response: re_pb2.ExecuteResponse) -> None:
        response.result.exit_code = outcome.exit_code
        if outcome.kind == "timeout":
            error: ServiceError = DeadlineExceeded(
                f"action timed out after {timeout_s:g} s; its processes were killed"
            )
            response.status.CopyFrom(to_status_proto(error))
        elif outcome.kind == "cancelled":
            raise Cancelled("the action was cancelled and its processes killed")
        elif outcome.kind in ("runner_error", "unclean", "lost"):
            response.status.CopyFrom(
                to_status_proto(
                    Internal(
                        f"the sidecar failed while running the action ({outcome.kind}, "
                        f"code {outcome.code}); the sidecar was replaced"
                    )
                )
            )
        if outcome.oom_kills:
            response.message = (
                f"the out-of-memory killer ended {outcome.oom_kills} process(es) of this action "
                "(sidecar memory limit); the sidecar was replaced"
            )

    def _remove_later(self, action_dir: Path) -> None:
        task = asyncio.create_task(
            anyio.to_thread.run_sync(functools.partial(shutil.rmtree, action_dir, True))
        )
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
