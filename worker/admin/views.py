"""Pools and operations as the admin protocol shows them."""

from __future__ import annotations

from worker.execution.operations import OperationState
from worker.pool.sidecar_pool import SidecarPool
from worker.reapi import admin_pb2, re_pb2


def pool_view(pool: SidecarPool, winding_down: bool = False) -> admin_pb2.Pool:
    counts = pool.counts()
    view = admin_pb2.Pool(
        image=pool.reference,
        image_id=pool.key.image_id,
        user=pool.key.user,
        network=pool.key.network,
        dispatch=pool.key.dispatch,
        idle=counts["idle"],
        busy=counts["busy"],
        starting=counts["starting"],
        retiring=counts["retiring"],
        max_sidecars=pool.settings.max_sidecars,
        min_idle=pool.settings.min_idle,
        warm_target=pool.warm_target,
        waiting=pool.waiting,
        leases=pool.stats.leases,
        served=pool.stats.served,
        idle_ttl_s=pool.settings.idle_ttl_s,
        drained=pool.draining,
        winding_down=winding_down or pool.superseded,
        cold_starts=pool.stats.cold_starts,
    )
    if pool.key.cpus is not None:
        view.cpus = pool.key.cpus
    if pool.key.memory_bytes is not None:
        view.memory_bytes = pool.key.memory_bytes
    if pool.key.pids_limit is not None:
        view.pids_limit = pool.key.pids_limit
    if pool.stats.held_p50_s is not None:
        view.run_p50_s = pool.stats.held_p50_s
    return view


def operation_view(state: OperationState) -> admin_pb2.OperationSummary:
    return admin_pb2.OperationSummary(
        name=state.name,
        action_digest=f"{state.action_digest.hash}/{state.action_digest.size}",
        stage=re_pb2.ExecutionStage.Value.Name(state.stage),
        done=state.done,
        status_code=state.response.status.code if state.response is not None else 0,
        watchers=state.watchers,
    )
