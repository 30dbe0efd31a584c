"""The worker threads that do the CAS's disk work, so the event loop never waits on a disk.

A pool of its own (not anyio's default one, which execution shares for Docker calls and
staging): a burst of actions cannot starve blob reads and writes of threads, and handing a
call to a plain executor costs less than anyio's to_thread (about 80 against 115 us here),
which is a good part of a 1 KiB write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

THREADS = 8

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="cas-io")
        return _pool


def submit(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
    """Starts fn in a CAS thread; await the future for its result."""
    call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
    return asyncio.get_running_loop().run_in_executor(pool(), call)


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Runs fn in a CAS thread and returns its result."""
    return await submit(fn, *args, **kwargs)
