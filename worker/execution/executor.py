"""Executes one action end to end: load, resolve the platform, stage, run in a sidecar, collect."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
from google.protobuf import duration_pb2, timestamp_pb2

from worker.cas.disk_store import DiskBlobStore
from worker.config import ExecutionSettings
from worker.digests import Digest
from worker.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    raise_if_disk_full,
    to_status_proto,
)
from worker.execution.agent_run import AgentRun
from worker.execution.inputs import (
    DirectoryCache,
    InputTree,
    check_action_paths,
    check_parsed_size,
    load_input_tree,
    stage_action,
)
from worker.execution.outputs import OutputBudget, OutputCollector, collect_stream
from worker.execution.platform import ExecutionPlatform, resolve_platform
from worker.execution.sidecar_run import RunOutcome, SidecarRun
from worker.handles import (
    LeavesTree,
    open_dir_at,
    open_trusted_dir,
    opened,
    remove_tree_at,
)
from worker.pool.pools import SidecarPools
from worker.pool.sidecar_pool import PoolDrained, PoolKey, Sidecar
from worker.reapi import re_pb2
from worker.runner_contract import (
    CONTROL,
    INPUT_ROOT,
    MAX_AGENT_REQUEST_BYTES,
    STDERR,
    STDOUT,
    ActionDir,
    RunRequest,
)
from worker.runtime.protocol import (
    ContainerGone,
    ContainerNotRunning,
    ContainerRuntimeError,
    RuntimeRejected,
    RuntimeUnavailable,
)

log = logging.getLogger(__name__)


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


M = TypeVar("M", re_pb2.Action, re_pb2.Command)
T = TypeVar("T")
Release = Callable[[Sidecar, bool, str], Awaitable[None]]


@dataclass(frozen=True)
class Loaded:
    """An action read and checked, before anything is leased or created for it."""

    action: re_pb2.Action
    command: re_pb2.Command
    timeout_s: float
    platform: ExecutionPlatform
    tree: InputTree


# Room for the paths and numbers of a request within the agent's limit.
MAX_COMMAND_BYTES = MAX_AGENT_REQUEST_BYTES - 64 * 1024
# How often an action waiting for the daemon tries again.
DAEMON_RETRY_S = 1.0


def load_message(store: DiskBlobStore, digest: Digest, kind: type[M]) -> M:
    """An Action or Command from the CAS; one larger than any this worker parses (a client's
    gigabyte blob would cost several times that in memory) is INVALID_ARGUMENT unread."""
    check_parsed_size(digest, kind.__name__)
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


def check_command(command: re_pb2.Command) -> None:
    """INVALID_ARGUMENT for what no process can be started with: an empty argv, a NUL byte
    in an argument or variable, a variable name that is empty or holds '=', or more than
    MAX_AGENT_REQUEST_BYTES of arguments and variables together (either dispatch)."""
    if not command.arguments:
        raise InvalidArgument("the Command has no arguments")
    size = 0
    for argument in command.arguments:
        if "\0" in argument:
            raise InvalidArgument("a Command argument holds a NUL byte")
        size += len(argument.encode()) + 1
    for variable in command.environment_variables:
        if not variable.name or "=" in variable.name or "\0" in variable.name:
            raise InvalidArgument(f"environment variable name {variable.name[:100]!r} is invalid")
        if "\0" in variable.value:
            raise InvalidArgument(f"environment variable {variable.name[:100]!r} holds a NUL byte")
        size += len(variable.name.encode()) + len(variable.value.encode()) + 2
    if size > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            f"the Command's arguments and environment take {size} bytes; at most "
            f"{MAX_COMMAND_BYTES} are supported"
        )


def action_environment(command: re_pb2.Command, action: ActionDir) -> dict[str, str]:
    """Exactly the Command's variables (on top of the image's own, which Docker supplies), plus
    HOME and TMPDIR inside the action directory unless the Command sets them."""
    env = {"HOME": str(action.home), "TMPDIR": str(action.tmp)}
    env.update((v.name, v.value) for v in command.environment_variables)
    return env


def retire_reason(outcome: RunOutcome, key: PoolKey) -> str:
    """Why a sidecar may not serve again after this outcome (pool.events.RETIRE_REASONS)."""
    if outcome.oom_kills:
        return "oom"
    if outcome.kind in ("timeout", "cancelled"):
        return outcome.kind
    if outcome.sidecar_reusable and key.single_use:
        return "single_use"
    return "unclean"


class ActionExecutor:
    """One action: load and check it, lease a sidecar, stage into that sidecar's directory,
    run, collect once no process of the action can run, clean up."""

    def __init__(
        self,
        store: DiskBlobStore,
        pools: SidecarPools,
        sidecar_run: SidecarRun,
        settings: ExecutionSettings,
        worker_name: str,
        trash_dir: Path,
    ) -> None:
        self._store = store
        self._pools = pools
        self._sidecar_run = sidecar_run
        self._agent_run = AgentRun()
        self._settings = settings
        self._worker = worker_name
        self._trash_dir = trash_dir
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
            # Action, Command and the input tree are read in one hand-off to a thread: each
            # hand-off costs more than reading a small blob.
            loaded = await anyio.to_thread.run_sync(self._load, action_digest, metadata)
            action = loaded.action
            await self._execute(loaded, metadata, cancelled, response)
        except Cancelled:
            raise
        except ServiceError as error:
            response.status.CopyFrom(to_status_proto(error))
        metadata.worker_completed_timestamp.CopyFrom(now())
        response.result.execution_metadata.CopyFrom(metadata)
        return response, action

    def _load(self, action_digest: Digest, metadata: re_pb2.ExecutedActionMetadata) -> Loaded:
        """Reads and checks everything an action needs before a sidecar is leased (in a
        thread): the Action, its Command, its platform and its whole input tree."""
        action = load_message(self._store, action_digest, re_pb2.Action)
        command = load_message(
            self._store, Digest.from_proto(action.command_digest), re_pb2.Command
        )
        check_command(command)
        timeout_s = action_timeout_s(action, self._settings)
        platform = resolve_platform(action, command, self._settings)
        metadata.input_fetch_start_timestamp.CopyFrom(now())
        tree = load_input_tree(
            self._directories,
            self._store,
            Digest.from_proto(action.input_root_digest),
            max_depth=self._settings.max_input_depth,
            max_entries=self._settings.max_input_entries,
        )
        check_action_paths(tree, command)
        return Loaded(action, command, timeout_s, platform, tree)

    async def _execute(
        self,
        loaded: Loaded,
        metadata: re_pb2.ExecutedActionMetadata,
        cancelled: asyncio.Event,
        response: re_pb2.ExecuteResponse,
    ) -> None:
        platform = loaded.platform
        # Pulls the image if needed; waits a while for a daemon that is away.
        key = await self._patiently(
            functools.partial(self._pools.key_for, platform.image, platform.user, platform.network),
            cancelled,
        )
        outcome = await self._run(
            platform,
            key,
            loaded.tree,
            loaded.command,
            loaded.timeout_s,
            cancelled,
            metadata,
            response,
        )
        self._judge(outcome, loaded.timeout_s, response)

    # ------------------------------------------------------------------ steps

    async def _patiently(self, step: Callable[[], Awaitable[T]], cancelled: asyncio.Event) -> T:
        """Runs a step that needs the Docker daemon, retrying for up to
        execution.daemon_wait_s while the daemon is away (restarting, say), so that actions
        that had not started yet run once it is back instead of failing."""
        deadline = time.monotonic() + self._settings.daemon_wait_s
        while True:
            try:
                return await step()
            except (RuntimeUnavailable, Unavailable) as error:
                if isinstance(error, PoolDrained):
                    raise  # an operator's decision, not a daemon away
                if time.monotonic() >= deadline or cancelled.is_set():
                    raise
                log.info("the Docker daemon is away; the action waits for it")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cancelled.wait(), DAEMON_RETRY_S)

    def _lease_function(
        self, platform: ExecutionPlatform, key: PoolKey
    ) -> Callable[[], Awaitable[tuple[Sidecar, Release]]]:
        """How to get a sidecar, and how to give that one back. The pool is looked up on every
        attempt: upkeep forgets an empty pool, and a retry must not lease from a pool no one
        maintains any more."""
        if platform.reuse_sidecar:

            async def lease() -> tuple[Sidecar, Release]:
                pool = self._pools.pool_for(key, platform.image)
                return await pool.lease(), pool.release

            return lease

        async def destroy(sidecar: Sidecar, reusable: bool, reason: str) -> None:
            await self._pools.destroy(sidecar)

        async def create() -> tuple[Sidecar, Release]:
            return await self._pools.create(key), destroy

        return create

    async def _run(
        self,
        platform: ExecutionPlatform,
        key: PoolKey,
        tree: InputTree,
        command: re_pb2.Command,
        timeout_s: float,
        cancelled: asyncio.Event,
        metadata: re_pb2.ExecutedActionMetadata,
        response: re_pb2.ExecuteResponse,
    ) -> RunOutcome:
        """Runs the command in a leased (or, for sidecar-reuse=false, a fresh) sidecar. A sidecar
        found gone or stopped before the exec started is replaced once."""
        lease = self._lease_function(platform, key)
        sharing = (
            self._pools.pool_for(key, platform.image).actions_per_sidecar
            if platform.reuse_sidecar
            else 1
        )
        attempts = 0
        while True:
            attempts += 1
            try:
                sidecar, release = await self._patiently(lease, cancelled)
            except RuntimeUnavailable as error:
                raise Unavailable(f"cannot create a sidecar: {error}") from None
            except ContainerRuntimeError as error:
                raise FailedPrecondition(
                    f"cannot create a sidecar of {platform.image}: {error}"
                ) from None
            assert sidecar.directory is not None
            action = ActionDir.new(sidecar.directory)
            reusable = False
            reason = "unclean"
            try:
                outcome, reusable = await self._run_in(
                    sidecar,
                    action,
                    platform,
                    tree,
                    command,
                    timeout_s,
                    sharing,
                    cancelled,
                    metadata,
                    response,
                    reuse=not key.single_use,
                )
                reason = retire_reason(outcome, key)
                return outcome
            except (ContainerGone, ContainerNotRunning) as error:
                log.warning("sidecar %s unusable (%s)", sidecar.short_id, error)
                if attempts == 2:
                    raise Unavailable(
                        f"sidecars of {platform.image} keep failing: {error}"
                    ) from None
            except RuntimeUnavailable as error:
                raise Unavailable(f"Docker daemon: {error}") from None
            except RuntimeRejected as error:
                raise FailedPrecondition(f"the Docker daemon refused: {error}") from None
            finally:
                if reusable:
                    self._remove_later(action.name)
                await release(sidecar, reusable, reason)

    async def _run_in(
        self,
        sidecar: Sidecar,
        action: ActionDir,
        platform: ExecutionPlatform,
        tree: InputTree,
        command: re_pb2.Command,
        timeout_s: float,
        sharing: int,
        cancelled: asyncio.Event,
        metadata: re_pb2.ExecutedActionMetadata,
        response: re_pb2.ExecuteResponse,
        reuse: bool,
    ) -> tuple[RunOutcome, bool]:
        """Stages, runs and collects in `sidecar`; also says whether the sidecar may serve
        again: the runner found it clean, `reuse` allows it, and this action's directory was
        moved out of it."""
        # The agent's greeting is awaited while the inputs are staged.
        connecting = (
            self._agent_run.connect_soon(sidecar) if sidecar.key.dispatch == "agent" else None
        )
        try:
            working_dir = await anyio.to_thread.run_sync(
                self._stage, tree, command, platform, action
            )
            metadata.input_fetch_completed_timestamp.CopyFrom(now())
            if cancelled.is_set():
                raise Cancelled("cancelled before it ran")
        except BaseException:
            if connecting is not None:
                self._agent_run.abandon(connecting)
            raise

        request = RunRequest(
            control_dir=action.control,
            uid=platform.uid,
            gid=platform.gid,
            timeout_ms=max(int(timeout_s * 1000), 1),
            working_dir=working_dir,
            argv=tuple(command.arguments),
            # Scratch places are shared by every action in a sidecar: emptied only when this
            # action had the sidecar to itself (actions_per_sidecar 1, the default).
            scrub=not platform.runs_as_root and sharing == 1,
            exclusive=sharing == 1,
        )
        metadata.execution_start_timestamp.CopyFrom(now())
        env = action_environment(command, action)
        if connecting is not None:
            outcome = await self._agent_run.run(
                sidecar, action, request, env, timeout_s, cancelled, connecting
            )
        else:
            outcome = await self._sidecar_run.run(
                sidecar, action, request, env, timeout_s, cancelled
            )
        metadata.execution_completed_timestamp.CopyFrom(now())
        response.result.exit_code = outcome.exit_code
        if not outcome.sidecar_reusable and (sharing == 1 or not outcome.tree_killed):
            # Outputs are read only once no process of the action can still run. In a shared
            # sidecar the runner's own whole-tree kill is enough when it reported one, so the
            # neighbours keep running; the sidecar then retires once they are done.
            try:
                await self._pools.stop(sidecar)
            except ContainerRuntimeError as error:
                raise Unavailable(
                    f"the sidecar could not be stopped ({error}); its outputs cannot be "
                    "collected safely"
                ) from None
        metadata.output_upload_start_timestamp.CopyFrom(now())
        reusable = await anyio.to_thread.run_sync(
            self._collect_and_clear,
            command,
            action,
            response.result,
            reuse and outcome.sidecar_reusable,
        )
        metadata.output_upload_completed_timestamp.CopyFrom(now())
        return outcome, reusable

    def _collect_and_clear(
        self, command: re_pb2.Command, action: ActionDir, result: re_pb2.ActionResult, reuse: bool
    ) -> bool:
        """Collects the outputs, then (when the sidecar is to serve again) moves the action's
        directory out of it, in one hand-off to a thread. True if the sidecar may serve again."""
        self._collect(command, action, result)
        return reuse and self._discard(action)

    def _stage(
        self,
        tree: InputTree,
        command: re_pb2.Command,
        platform: ExecutionPlatform,
        action: ActionDir,
    ) -> Path:
        owner = (platform.uid, platform.gid) if os.geteuid() == 0 else None
        try:
            return stage_action(
                tree,
                self._store,
                command,
                action,
                owner=owner,
                copy_files=platform.runs_as_root,
            )
        except OSError as error:
            raise_if_disk_full(error, "the input root")
            raise Internal(f"staging the input root failed: {error}") from error

    def _collect(
        self, command: re_pb2.Command, action: ActionDir, result: re_pb2.ActionResult
    ) -> None:
        budget = OutputBudget(self._settings.max_output_bytes)
        try:
            with (
                opened(open_trusted_dir(action.sidecar_dir)) as sidecar_fd,
                opened(open_dir_at(sidecar_fd, action.name)) as action_fd,
            ):
                with opened(open_dir_at(action_fd, CONTROL)) as control_fd:
                    result.stdout_digest.CopyFrom(
                        collect_stream(self._store, control_fd, STDOUT, budget).to_proto()
                    )
                    result.stderr_digest.CopyFrom(
                        collect_stream(self._store, control_fd, STDERR, budget).to_proto()
                    )
                with opened(open_dir_at(action_fd, INPUT_ROOT)) as root_fd:
                    OutputCollector(
                        self._store,
                        root_fd,
                        command.working_directory,
                        self._settings.max_input_depth,
                        budget,
                    ).collect(command, result)
        except (LeavesTree, FileNotFoundError) as error:
            raise FailedPrecondition(
                f"the action replaced a directory the worker made for it ({error})"
            ) from None
        except OSError as error:
            raise_if_disk_full(error, "the action's outputs")
            raise Internal(f"collecting outputs failed: {error}") from error

    def _discard(self, action: ActionDir) -> bool:
        """Moves a finished action's directory out of its sidecar's, so the next action there
        cannot see it. False if it could not be moved."""
        try:
            with (
                opened(open_trusted_dir(action.sidecar_dir)) as sidecar_fd,
                opened(open_trusted_dir(self._trash_dir)) as trash_fd,
            ):
                os.rename(action.name, action.name, src_dir_fd=sidecar_fd, dst_dir_fd=trash_fd)
        except OSError as error:
            log.warning("could not clear %s: %s; the sidecar goes", action.path, error)
            return False
        return True

    @staticmethod
    def _judge(outcome: RunOutcome, timeout_s: float, response: re_pb2.ExecuteResponse) -> None:
        response.result.exit_code = outcome.exit_code
        if outcome.kind == "timeout":
            error: ServiceError = DeadlineExceeded(
                f"action timed out after {timeout_s:g} s; its processes were killed"
            )
            response.status.CopyFrom(to_status_proto(error))
        elif outcome.kind == "cancelled":
            # The ExecuteResponse keeps what was collected; CANCELLED is never cached.
            response.status.CopyFrom(
                to_status_proto(Cancelled("the action was cancelled and its processes killed"))
            )
        elif outcome.kind in ("runner_error", "unclean", "lost"):
            detail = f": {outcome.detail}" if outcome.detail else ""
            response.status.CopyFrom(
                to_status_proto(
                    Internal(
                        f"the sidecar failed while running the action ({outcome.kind}, "
                        f"code {outcome.code}{detail}); the sidecar was replaced"
                    )
                )
            )
        if outcome.oom_kills:
            response.message = (
                f"the out-of-memory killer ended {outcome.oom_kills} process(es) of this action "
                "(sidecar memory limit); the sidecar was replaced"
            )

    def _remove_later(self, name: str) -> None:
        def remove() -> None:
            with opened(open_trusted_dir(self._trash_dir)) as trash_fd:
                remove_tree_at(trash_fd, name)

        task = asyncio.create_task(anyio.to_thread.run_sync(remove))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def close(self) -> None:
        """Waits for background removals."""
        if self._cleanups:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._cleanups, return_exceptions=True)
