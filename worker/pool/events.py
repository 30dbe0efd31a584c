"""What the pools report as it happens (sidecars made and retired, lease waits, pulls), for
whoever watches: the metrics. The pools never import a metrics library."""

from __future__ import annotations

from typing import Protocol

# Why a sidecar was retired (the `reason` of PoolEvents.sidecar_retired).
RETIRE_REASONS = (
    "timeout",  # the action timed out
    "oom",  # the out-of-memory killer hit the sidecar
    "cancelled",  # the action was cancelled
    "unclean",  # the runner's report was missing or said the sidecar is not clean
    "single_use",  # root actions and images with VOLUMEs: one action per sidecar
    "uses",  # max_actions_per_sidecar reached
    "age",  # max_age_s reached
    "idle_ttl",  # idle past idle_ttl_s above min_idle
    "dead",  # found not running by upkeep
    "evicted",  # made room for another pool under max_sidecars_total
    "operator",  # pools recycle/drain/refresh/scale, or a configuration reload
)


class PoolLabels(Protocol):
    """What identifies a pool to an observer."""

    @property
    def reference(self) -> str: ...

    @property
    def image_id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def network(self) -> str: ...


class PoolEvents(Protocol):
    def lease_waited(self, pool: PoolLabels, seconds: float) -> None: ...

    def sidecar_held(self, pool: PoolLabels, seconds: float) -> None:
        """An action had the sidecar this long (lease to release)."""

    def sidecar_created(self, pool: PoolLabels, cold: bool) -> None:
        """cold: made while a lease waited for it, not pre-warmed."""

    def sidecar_retired(self, pool: PoolLabels, reason: str) -> None: ...

    def image_pulled(self, reference: str, seconds: float, ok: bool) -> None: ...


class NoEvents:
    """Nobody watches."""

    def lease_waited(self, pool: PoolLabels, seconds: float) -> None:
        pass

    def sidecar_held(self, pool: PoolLabels, seconds: float) -> None:
        pass

    def sidecar_created(self, pool: PoolLabels, cold: bool) -> None:
        pass

    def sidecar_retired(self, pool: PoolLabels, reason: str) -> None:
        pass

    def image_pulled(self, reference: str, seconds: float, ok: bool) -> None:
        pass
