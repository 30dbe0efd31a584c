"""One timing loop for every throughput figure: client threads share a list of work items."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

C = TypeVar("C")
T = TypeVar("T")


def items_per_second(
    items: Sequence[T], clients: Sequence[C], do: Callable[[C, T], object]
) -> float:
    """One thread per client, each taking the next item and calling do(client, item) until
    none is left; timed from the moment all threads are ready until the last ends. The first
    error of any thread is raised after all have ended."""
    pending = list(items)
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(len(clients) + 1)

    def work(client: C) -> None:
        start.wait()
        while True:
            with lock:
                if not pending:
                    return
                item = pending.pop()
            try:
                do(client, item)
            except BaseException as error:
                errors.append(error)
                return

    threads = [threading.Thread(target=work, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return len(items) / elapsed
