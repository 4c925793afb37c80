"""Model forwards off the event loop (``ForwardPool``).

A request's forward pass (encoding, the network, the combination of the heads) is CPU-bound: it
runs in a small thread pool (``forward_workers`` threads named ``mtrank-forward``), so the event
loop keeps answering health checks, metrics and other requests meanwhile. Requests of at most
``inline_max_candidates`` candidates are scored inline, since their forward costs less than the
hop to a thread and back; with ``forward_in_thread`` off, every request is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.settings import Settings

T = TypeVar("T")


class ForwardPool:
    """Runs scoring functions on the pool between ``start`` and ``stop``, inline otherwise."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self.settings.forward_in_thread and self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.settings.forward_workers, thread_name_prefix="mtrank-forward"
            )

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def run(self, candidates: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` for a request of ``candidates`` candidates: in the pool, or inline (on the
        event loop) when there is no pool or the request is small."""
        if self._executor is None or candidates <= self.settings.inline_max_candidates:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
