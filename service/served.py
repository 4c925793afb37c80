"""The served model (``ServedModel``): one immutable ``ActiveModel``, switched in two phases.

``current`` is replaced by a single reference assignment (atomic in CPython). A request reads it
once at its start and keeps using that object, so a switch never affects a request in flight and
never fails one.

``activate`` has the loader (service.loader) build the new version off the request path, then
switches in two phases with no await in between: the feature store makes live what it staged for
the new model (``commit``), then the reference is swapped, so no request sees the new tables with
the old model or the other way round. Activations run one at a time (a lock), and whether a
version is already served is decided under that lock, after any activation in progress.

A version that cannot be served (or an unusable LATEST, which the watcher reports here) is kept as
``last_error`` (``GET /admin/model``), counted as ``mtrank_model_reload_total{result="error"}`` and
logged; the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

from model import LATEST
from service.latest import PointerError
from service.loader import ActiveModel, ModelLoader, ReloadError, ReloadSource, iso
from service.metrics import Metrics

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Collect, then move every object alive now (the app, the loaded models, the feature tables:
    hundreds of thousands of them) into the permanent generation, which the cyclic garbage
    collector no longer traverses: without it each full collection walked them all, 130-250 ms
    with the event loop stopped (docs/performance.md). Called after every model switch; objects
    of a replaced model are still freed by reference counting (they hold no cycles the collector
    would be needed for)."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("gc: %d objects frozen in %.1f ms", gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3)


class ServedModel:
    """The model being served (``current``, None until one is), switched by ``activate``, and the
    last rejection (``last_error``)."""

    def __init__(self, loader: ModelLoader, metrics: Metrics) -> None:
        self.loader, self.metrics = loader, metrics
        self._current: ActiveModel | None = None
        self._lock = asyncio.Lock()
        self.last_error: dict[str, Any] | None = None

    @property
    def current(self) -> ActiveModel | None:
        return self._current

    @property
    def version_or_none(self) -> str | None:
        return self._current.version if self._current else None

    async def activate(self, version: str, source: ReloadSource) -> ActiveModel:
        """Load, validate and swap in ``version``; ReloadError (old model kept) on any problem."""
        async with self._lock:
            current = self._current
            if current is not None and current.version == version:
                return current
            t0 = time.perf_counter()
            try:
                active = await self.loader.load(version, source)
            except ReloadError as e:
                self.record_error(e)
                raise
            # make what the store staged for it live, then swap: no await in between, so no
            # request sees the new tables with the old model or the other way round
            self.loader.store.commit(active.columns)
            self._current = active  # the swap: one reference assignment
            freeze_heap()
            self.metrics.model_reloads.labels("ok").inc()
            self.metrics.set_model(active.version, active.ranker.config.model.arch, active.loaded_at)
            log.info(
                "serving model %s (%s, from %s) after %.2fs; previous %s",
                active.version,
                active.ranker.config.model.arch,
                source,
                time.perf_counter() - t0,
                current.version if current else None,
            )
            return active

    def record_error(self, e: ReloadError) -> None:
        """A version (or LATEST itself) rejected: /admin/model's last_reload_error, the error counter,
        a log."""
        self.metrics.model_reloads.labels("error").inc()
        repeated = self.last_error is not None and self.last_error["error"] == e.message
        self.last_error = {
            "version": e.version,
            "error": e.message,
            "at": iso(time.time()),
            "transient": e.transient,
            "next_retry_at": None,
        }
        serving = self.version_or_none
        if isinstance(e, PointerError) and serving is None:  # e.g. nothing trained yet
            log.log(logging.DEBUG if repeated else logging.WARNING, "no model to serve yet: %s", e.message)
            return
        what = f"{LATEST} pointer" if isinstance(e, PointerError) else f"model {e.version}"
        level = logging.DEBUG if repeated else logging.ERROR
        log.log(level, "%s rejected (%s); still serving %s", what, e.message, serving)
