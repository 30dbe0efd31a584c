"""What the bot offers the scheduler: the primary device's properties (OSFamily, ISA, one
`container-image=docker://REF` per image pool, extra KEY=VALUE pairs) and its capacity.

BuildGrid matches jobs against the primary device's properties only (`Worker.properties` is
ignored), with exact string equality, and stores every subset of the offered pairs: so the
offer lists only what this worker really serves."""

from __future__ import annotations

from dataclasses import dataclass

from worker.bots.rwapi import worker_pb2
from worker.config import Settings
from worker.execution.platform import HOST_ISA, IMAGE, ISA, OS_FAMILY

OS_FAMILY_VALUE = "linux"
CAPACITY = "capacity"


@dataclass(frozen=True)
class Offer:
    handle: str
    properties: tuple[tuple[str, str], ...]
    capacity: int

    def to_worker(self) -> worker_pb2.Worker:
        device = worker_pb2.Device(handle=self.handle)
        for key, value in self.properties:
            device.properties.add(key=key, value=value)
        worker = worker_pb2.Worker(devices=[device])
        worker.configs.add(key=CAPACITY, value=str(self.capacity))
        return worker

    def describe(self) -> str:
        pairs = ", ".join(f"{key}={value}" for key, value in self.properties)
        return f"{pairs}; capacity {self.capacity}"

    def as_dict(self) -> dict[str, object]:
        return {
            "handle": self.handle,
            "properties": [[key, value] for key, value in self.properties],
            "capacity": self.capacity,
        }


def split_property(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.strip(), value.strip()


def build_offer(settings: Settings, handle: str) -> Offer:
    pairs: list[tuple[str, str]] = [(OS_FAMILY, OS_FAMILY_VALUE), (ISA, HOST_ISA)]
    pairs += [(IMAGE, f"docker://{image}") for image in sorted(settings.execution.image_pools)]
    pairs += [split_property(text) for text in settings.bot.properties]
    unique = tuple(dict.fromkeys(pairs))  # the order stays, repeats go
    return Offer(handle, unique, settings.execution.max_concurrent_actions)


def extra_property_keys(settings: Settings) -> list[str]:
    """Keys offered with --property: actions may carry them, and the executor must accept them
    (it rejects platform properties it does not know)."""
    known = {OS_FAMILY, ISA, IMAGE}
    keys = (split_property(text)[0] for text in settings.bot.properties)
    return sorted({key for key in keys if key not in known})
