"""Runs blocking runtime calls in worker threads, bounded by a shared limiter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def in_thread(
    limiter: anyio.CapacityLimiter, function: Callable[[Unpack[Ts]], T], *args: *Ts
) -> T:
    return await anyio.to_thread.run_sync(function, *args, limiter=limiter)
