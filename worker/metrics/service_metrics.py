"""Every metric of one service, in its own registry: counters and histograms fed by events as
they happen, gauges read from the live objects when Prometheus scrapes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.cas.disk_store import CasCounters
from worker.pool.events import PoolLabels
from worker.pool.sidecar_pool import SidecarPool

PREFIX = "sidecar_executor"
POOL_LABELS = ("image", "image_id", "user", "network")
# Lease waits run from microseconds (a warm idle sidecar) to a pull plus a cold start.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
PULL_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)


# Images and users are named by clients: at most this many distinct pools (and as many
# images pulled) get labels of their own in the event counters; any further one is counted
# under OVERFLOW, so a client naming endless images or users cannot grow memory without end.
MAX_LABEL_SETS = 1000
OVERFLOW = "(other)"


def pool_labels(pool: PoolLabels) -> tuple[str, str, str, str]:
    return (pool.reference, pool.image_id, pool.user, pool.network)


class LabelBudget:
    """Passes the first `limit` distinct label tuples through as they are; any other comes
    out as OVERFLOW in every position."""

    def __init__(self, limit: int | None = None) -> None:
        self._limit = MAX_LABEL_SETS if limit is None else limit
        self._seen: set[tuple[str, ...]] = set()

    def __call__(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if labels in self._seen:
            return labels
        if len(self._seen) < self._limit:
            self._seen.add(labels)
            return labels
        return (OVERFLOW,) * len(labels)


class PoolSource(Protocol):
    @property
    def pools(self) -> list[SidecarPool]: ...

    @property
    def retiring_pools(self) -> list[SidecarPool]: ...


class QueueSource(Protocol):
    @property
    def queue_length(self) -> int: ...

    @property
    def running_count(self) -> int: ...


class StoreSource(Protocol):
    counters: CasCounters
    max_bytes: int

    @property
    def total_bytes(self) -> int: ...

    @property
    def blob_count(self) -> int: ...


class ServiceMetrics:
    """The metrics of one service. Implements pool.events.PoolEvents; `action_finished`
    counts every ended operation; `watch` names the objects read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._leases = Counter(
            f"{PREFIX}_pool_leases", "sidecars leased for actions", POOL_LABELS, registry=r
        )
        self._lease_wait = Histogram(
            f"{PREFIX}_pool_lease_wait_seconds",
            "time an action waited for a sidecar (a cold start or a pull included)",
            POOL_LABELS,
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._held = Histogram(
            f"{PREFIX}_pool_run_seconds",
            "time an action held its sidecar (staging, run and output collection)",
            POOL_LABELS,
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self._cold = Counter(
            f"{PREFIX}_pool_cold_starts",
            "sidecars created while an action waited for them",
            POOL_LABELS,
            registry=r,
        )
        self._prewarmed = Counter(
            f"{PREFIX}_pool_prewarms",
            "sidecars created ahead of demand (min_idle, autoscaling, recycling)",
            POOL_LABELS,
            registry=r,
        )
        self._recycles = Counter(
            f"{PREFIX}_pool_recycles",
            "sidecars retired, by reason",
            (*POOL_LABELS, "reason"),
            registry=r,
        )
        self._pulls = Counter(
            f"{PREFIX}_image_pulls", "image pulls, by result", ("image", "result"), registry=r
        )
        self._pull_time = Histogram(
            f"{PREFIX}_image_pull_seconds",
            "duration of image pulls",
            ("image",),
            buckets=PULL_BUCKETS,
            registry=r,
        )
        self._actions = Counter(
            f"{PREFIX}_actions",
            "ended operations, by outcome (cached, success, exit_nonzero, error) and the "
            "ExecuteResponse status code",
            ("outcome", "status"),
            registry=r,
        )
        self.grpc_requests = Counter(
            f"{PREFIX}_grpc_requests",
            "gRPC requests handled, by method and status code",
            ("method", "code"),
            registry=r,
        )
        self._live = _LiveCollector()
        r.register(self._live)
        self._pool_budget = LabelBudget()
        self._image_budget = LabelBudget()

    def watch(
        self,
        store: StoreSource,
        pools: PoolSource | None = None,
        queue: QueueSource | None = None,
    ) -> None:
        self._live.store, self._live.pools, self._live.queue = store, pools, queue

    # ------------------------------------------------- pool.events.PoolEvents

    def _pool(self, pool: PoolLabels) -> tuple[str, ...]:
        return self._pool_budget(pool_labels(pool))

    def lease_waited(self, pool: PoolLabels, seconds: float) -> None:
        labels = self._pool(pool)
        self._leases.labels(*labels).inc()
        self._lease_wait.labels(*labels).observe(seconds)

    def sidecar_held(self, pool: PoolLabels, seconds: float) -> None:
        self._held.labels(*self._pool(pool)).observe(seconds)

    def sidecar_created(self, pool: PoolLabels, cold: bool) -> None:
        (self._cold if cold else self._prewarmed).labels(*self._pool(pool)).inc()

    def sidecar_retired(self, pool: PoolLabels, reason: str) -> None:
        self._recycles.labels(*self._pool(pool), reason).inc()

    def image_pulled(self, reference: str, seconds: float, ok: bool) -> None:
        (image,) = self._image_budget((reference,))
        self._pulls.labels(image, "ok" if ok else "failed").inc()
        self._pull_time.labels(image).observe(seconds)

    # ------------------------------------------------------------- execution

    def action_finished(self, outcome: str, status: str) -> None:
        self._actions.labels(outcome, status).inc()


class _LiveCollector(Collector):
    """Gauges and totals read from the live objects at scrape time."""

    def __init__(self) -> None:
        self.store: StoreSource | None = None
        self.pools: PoolSource | None = None
        self.queue: QueueSource | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # names depend on what is watched; collected fresh every scrape

    def collect(self) -> Iterator[Metric]:
        if self.pools is not None:
            yield from self._pool_metrics(self.pools)
        if self.queue is not None:
            depth = GaugeMetricFamily(
                f"{PREFIX}_execution_queue_depth", "actions queued for an execution slot"
            )
            depth.add_metric([], self.queue.queue_length)
            running = GaugeMetricFamily(
                f"{PREFIX}_execution_running", "actions holding an execution slot"
            )
            running.add_metric([], self.queue.running_count)
            yield from (depth, running)
        if self.store is not None:
            yield from self._cas_metrics(self.store)

    @staticmethod
    def _pool_metrics(source: PoolSource) -> Iterator[Metric]:
        sidecars = GaugeMetricFamily(
            f"{PREFIX}_pool_sidecars", "sidecars by state", labels=(*POOL_LABELS, "state")
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}_pool_waiting_leases",
            "actions waiting for a sidecar of the pool",
            labels=POOL_LABELS,
        )
        maximum = GaugeMetricFamily(
            f"{PREFIX}_pool_max_sidecars", "the pool's max_sidecars", labels=POOL_LABELS
        )
        target = GaugeMetricFamily(
            f"{PREFIX}_pool_warm_target",
            "idle sidecars the pool keeps: min_idle plus the autoscaling boost",
            labels=POOL_LABELS,
        )
        drained = GaugeMetricFamily(
            f"{PREFIX}_pool_drained", "1 while an operator has drained the pool", labels=POOL_LABELS
        )
        # A pool winding down may share labels with its successor: sum them.
        counts: dict[tuple[str, ...], dict[str, int]] = {}
        for pool in [*source.pools, *source.retiring_pools]:
            into = counts.setdefault(pool_labels(pool), dict.fromkeys(pool.counts(), 0))
            for state, number in pool.counts().items():
                into[state] += number
        for labels, states in counts.items():
            for state, number in states.items():
                sidecars.add_metric([*labels, state], number)
        for pool in source.pools:
            pool_label_values = list(pool_labels(pool))
            waiting.add_metric(pool_label_values, pool.waiting)
            maximum.add_metric(pool_label_values, pool.settings.max_sidecars)
            target.add_metric(pool_label_values, pool.warm_target)
            drained.add_metric(pool_label_values, 1 if pool.draining else 0)
        yield from (sidecars, waiting, maximum, target, drained)

    @staticmethod
    def _cas_metrics(store: StoreSource) -> Iterator[Metric]:
        c = store.counters
        size = GaugeMetricFamily(f"{PREFIX}_cas_bytes", "bytes stored in the CAS")
        size.add_metric([], store.total_bytes)
        limit = GaugeMetricFamily(f"{PREFIX}_cas_max_bytes", "storage.max_bytes")
        limit.add_metric([], store.max_bytes)
        blobs = GaugeMetricFamily(f"{PREFIX}_cas_blobs", "blobs stored in the CAS")
        blobs.add_metric([], store.blob_count)
        ratio = GaugeMetricFamily(
            f"{PREFIX}_cas_hit_ratio",
            "share of digests FindMissingBlobs found stored, since start (NaN before any)",
        )
        ratio.add_metric([], c.lookup_hits / c.lookups if c.lookups else float("nan"))
        yield from (size, limit, blobs, ratio)
        for name, value, text in (
            ("cas_evictions", c.evictions, "blobs evicted to stay under storage.max_bytes"),
            ("cas_lookups", c.lookups, "digests FindMissingBlobs asked about"),
            ("cas_lookup_hits", c.lookup_hits, "of those, found stored"),
            ("cas_upload_bytes", c.bytes_stored, "bytes of new blobs written into the CAS"),
            ("cas_download_bytes", c.bytes_read, "bytes of blobs read out of the CAS"),
        ):
            total = CounterMetricFamily(f"{PREFIX}_{name}", text)
            total.add_metric([], value)
            yield total
