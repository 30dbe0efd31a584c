"""Wiring only: settings -> storage (+ execution) -> servicers -> one grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from worker.admin.reload import ConfigReloader, restart_only_changes, with_live_fields
from worker.admin.server import AdminServer
from worker.admin.servicer import AdminServicer
from worker.cas import io_threads
from worker.cas.action_cache import DiskActionCache
from worker.cas.disk_store import DiskBlobStore
from worker.cas.uploads import UploadTracker
from worker.config import Settings
from worker.execution.outcome import outcome_of
from worker.execution.wiring import ExecutionSide
from worker.identity import claim_data_dir
from worker.metrics.http import MetricsEndpoint
from worker.metrics.interceptor import RequestCounter
from worker.metrics.service_metrics import ServiceMetrics
from worker.reapi import bs_pb2, ops_grpc, ops_pb2, re_grpc, re_pb2
from worker.server import bytestream
from worker.server.action_cache import ActionCacheServicer
from worker.server.auth import (
    BearerTokenInterceptor,
    CertificateFiles,
    TokenFile,
    log_protection,
)
from worker.server.bytestream import ByteStreamServicer
from worker.server.capabilities import CapabilitiesServicer, server_capabilities
from worker.server.cas import ContentAddressableStorageServicer
from worker.server.execution import ExecutionServicer, OperationsServicer

log = logging.getLogger(__name__)

# The health service name liveness probes ask: SERVING while the process serves at all, even
# while execution waits for its daemon (readiness probes ask "", which follows execution).
LIVENESS = "liveness"


@dataclass
class Storage:
    blobs: DiskBlobStore
    action_cache: DiskActionCache
    uploads: UploadTracker


def open_storage(settings: Settings) -> Storage:
    blobs = DiskBlobStore(
        settings.data_dir / "cas", settings.storage.max_bytes, settings.storage.durability
    )
    return Storage(
        blobs=blobs,
        action_cache=DiskActionCache(settings.data_dir / "action-cache", blobs),
        uploads=UploadTracker(
            blobs,
            ttl_s=settings.storage.upload_ttl_s,
            max_uploads=settings.storage.max_partial_uploads,
        ),
    )


class Service:
    """The whole service in one process: call start(), then wait() or stop()."""

    def __init__(
        self,
        settings: Settings,
        reload_settings: Callable[[], Settings] | None = None,
        config_file: Path | None = None,
    ) -> None:
        """`reload_settings` loads the configuration again (file, environment, flags) for a
        reload on SIGHUP or when `config_file` changes; without it the service never reloads."""
        self.settings = settings
        self._reload_settings = reload_settings
        self._config_file = config_file
        self.metrics = ServiceMetrics()
        self.worker_name = settings.server.worker_name or socket.gethostname()
        self.identity = claim_data_dir(settings.data_dir)
        try:
            self._build(settings)
        except BaseException:
            self.identity.release()
            raise

    def _build(self, settings: Settings) -> None:
        self.storage = open_storage(settings)
        max_message = settings.server.max_message_bytes
        # Requests are counted before they are authenticated, so refused ones show too.
        # The methods are known once the servicers are added (_add_servicers).
        self._counter = RequestCounter(self.metrics.grpc_requests, known_methods=frozenset())
        interceptors: list[grpc.aio.ServerInterceptor] = [self._counter]  # type: ignore[type-arg]
        self._certificates = None
        if settings.server.tls.enabled:
            self._certificates = CertificateFiles(settings.server.tls)
        if settings.server.auth.token_file is not None:
            interceptors.append(BearerTokenInterceptor(TokenFile(settings.server.auth.token_file)))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
            ],
        )
        self.port = 0
        self._health = HealthServicer()
        # Health alone, in plain text, for probes that cannot speak the REAPI port's TLS.
        self.health_port = 0
        self._health_server: grpc.aio.Server | None = None
        if settings.server.health_listen is not None:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
        self.execution: ExecutionSide | None = None
        if settings.execution.enabled:
            self.execution = ExecutionSide(
                settings,
                self.worker_name,
                self.identity.worker_id,
                self.storage.blobs,
                self.storage.action_cache,
                pool_events=self.metrics,
                on_operation_finished=self._count_outcome,
            )
        self._add_servicers()
        self._add_operator_side()

    def _add_servicers(self) -> None:
        storage, server = self.storage, self.server
        capabilities = server_capabilities(
            self.settings.storage.max_batch_total_size_bytes,
            execution_enabled=self.execution is not None,
        )
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesServicer(capabilities), server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(
            ContentAddressableStorageServicer(
                storage.blobs,
                self.settings.storage.max_batch_total_size_bytes,
                max_message_bytes=self.settings.server.max_message_bytes,
            ),
            server,
        )
        bytestream.add_to_server(ByteStreamServicer(storage.blobs, storage.uploads), server)
        re_grpc.add_ActionCacheServicer_to_server(
            ActionCacheServicer(storage.action_cache, storage.blobs), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reapi_services = ["Capabilities", "ContentAddressableStorage", "ActionCache"]
        if self.execution is not None:
            re_grpc.add_ExecutionServicer_to_server(
                ExecutionServicer(self.execution.service), server
            )
            ops_grpc.add_OperationsServicer_to_server(
                OperationsServicer(self.execution.service), server
            )
            reapi_services.append("Execution")
        names = [re_pb2.DESCRIPTOR.services_by_name[name].full_name for name in reapi_services]
        self._execution_names: list[str] = []
        if self.execution is not None:
            names.append(ops_pb2.DESCRIPTOR.services_by_name["Operations"].full_name)
            self._execution_names = [
                re_pb2.DESCRIPTOR.services_by_name["Execution"].full_name,
                names[-1],
            ]
        names.append(bs_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
        self._service_names = names
        self._counter.known_methods = frozenset(
            f"/{name}/{method.name}"
            for name in [*names, reflection.SERVICE_NAME]
            for method in descriptor_pool.Default().FindServiceByName(name).methods
        )

    def _count_outcome(self, response: re_pb2.ExecuteResponse) -> None:
        self.metrics.action_finished(*outcome_of(response))

    def _add_operator_side(self) -> None:
        """Metrics, the admin interface (never on the REAPI port) and config reload."""
        execution = self.execution
        self.metrics.watch(
            self.storage.blobs,
            execution.pools if execution else None,
            execution.service if execution else None,
        )
        self.metrics_endpoint: MetricsEndpoint | None = None
        admin_address = self.settings.admin_address
        if admin_address == self.settings.server.listen:
            raise OSError(f"admin.listen {admin_address} must not be the REAPI address")
        self.admin = AdminServer(
            admin_address,
            AdminServicer(
                execution.pools if execution else None, execution.service if execution else None
            ),
            interceptors=[RequestCounter(self.metrics.grpc_requests)],
            health=self._health,
        )
        self.reloader: ConfigReloader | None = None
        if self._reload_settings is not None:
            self.reloader = ConfigReloader(
                self._config_file,
                self._reload_settings,
                self.apply_settings,
                self.settings.admin.reload_interval_s,
            )

    async def apply_settings(self, loaded: Settings) -> None:
        """A reloaded configuration: pool settings apply now, the rest at the next restart."""
        for path in restart_only_changes(self.settings, loaded):
            log.warning("configuration: %s changed; it takes effect at the next restart", path)
        before = self.settings.execution.pool
        self.settings = with_live_fields(self.settings, loaded)
        if self.execution is not None:
            changed = await self.execution.pools.apply_settings(self.settings.execution)
            if before != self.settings.execution.pool:
                changed = ["(execution.pool defaults)", *changed]
            log.info("configuration reloaded; pool settings changed: %s", changed or "none")

    async def _start_operator_side(self) -> None:
        try:
            await self.admin.start()
        except OSError as error:
            if self.settings.admin.listen is not None:
                raise
            # The default socket in a deep data directory: serve REAPI anyway.
            log.error("admin interface disabled: %s", error)
        if self.settings.metrics.listen is not None:
            self.metrics_endpoint = await asyncio.to_thread(
                MetricsEndpoint, self.settings.metrics.listen, self.metrics.registry
            )
        if self.reloader is not None:
            self.reloader.start()

    async def _stop_operator_side(self) -> None:
        if self.reloader is not None:
            await self.reloader.close()
        await self.admin.stop()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.close)

    async def start(self) -> None:
        """Serves at once, then starts execution: until the Docker daemon answers and shares
        the exec root, health says NOT_SERVING for "" and Execution (LIVENESS says SERVING).
        Returns once execution is ready; raises StartupFailed when it cannot be."""
        listen = self.settings.server.listen
        if self._certificates is not None:
            self.port = self.server.add_secure_port(listen, self._certificates.credentials())
        else:
            self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        await self.server.start()
        await self._start_health_port()
        await self._start_operator_side()
        for name in [LIVENESS, *self._service_names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._execution_health("starting")
        host = self.settings.server.listen.rpartition(":")[0]
        if self.execution is not None:
            log.info(
                "listening on %s:%d; execution starts once its daemon is ready", host, self.port
            )
            try:
                await self.execution.start(listener=self._execution_health)
            except BaseException:
                await self._abandon_start()
                raise
        await self._execution_health(None)
        # Scripts and tests take this line as "ready": it comes once execution works.
        log.info("serving REAPI v2 on %s:%d (data in %s)", host, self.port, self.settings.data_dir)
        log_protection(self.settings.server)

    async def _start_health_port(self) -> None:
        health_listen = self.settings.server.health_listen
        if self._health_server is None or health_listen is None:
            return
        self.health_port = self._health_server.add_insecure_port(health_listen)
        if self.health_port == 0:
            raise OSError(f"cannot listen on {health_listen} (server.health_listen)")
        await self._health_server.start()
        log.info(
            "health alone, in plain text, on %s:%d",
            health_listen.rpartition(":")[0],
            self.health_port,
        )

    async def _stop_health_port(self) -> None:
        """Last of all: liveness must keep answering while running actions drain."""
        if self._health_server is not None:
            await self._health_server.stop(0)

    async def _execution_health(self, problem: str | None) -> None:
        """The overall status ("", what readiness probes ask) follows execution's readiness."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if problem is None or self.execution is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._execution_names]:
            await self._health.set(name, status)

    async def _abandon_start(self) -> None:
        await self._stop_operator_side()
        await self.server.stop(0)
        if self.execution is not None:
            await self.execution.close()
        await io_threads.run(self.storage.uploads.close)  # waits on appends in flight
        await io_threads.run(self.storage.blobs.close)
        await self._stop_health_port()
        self.identity.release()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops gracefully: health says NOT_SERVING, Execute is refused, queued actions end
        UNAVAILABLE, running ones get `grace_s` (server.shutdown_grace_s) to finish and the
        rest end UNAVAILABLE; then open streams get a moment to deliver, sidecars go."""
        grace = self.settings.server.shutdown_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        await self._stop_operator_side()
        if self.execution is not None:
            await self.execution.drain(grace)
        await self.server.stop(min(grace, 5.0))
        if self.execution is not None:
            await self.execution.close()
        await io_threads.run(self.storage.uploads.close)  # waits on appends in flight
        await io_threads.run(self.storage.blobs.close)  # journalled blobs become files
        await self._stop_health_port()
        self.identity.release()

    async def wait(self) -> None:
        await self.server.wait_for_termination()
