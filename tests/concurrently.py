"""Runs one function from several threads at once and collects what they raised."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_concurrently(function: Callable[[], object], threads: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            function()
        except BaseException as error:  # reported to the caller
            errors.append(error)

    started = [threading.Thread(target=guarded) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    return errors
