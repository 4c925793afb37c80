"""The served model and its hot reload, assembled: ``ModelHolder``, the one object the app uses.

A new version is loaded off the request path and swapped in only once it is known to work;
anything that fails along the way rejects that version (logged, counted as
``mtrank_model_reload_total{result="error"}``, shown by ``GET /admin/model``) and the old model
keeps serving. The parts, each usable on its own:

- service.loader: a version -> a validated, warmed ``ActiveModel`` (``ModelLoader``);
- service.served: the served ``ActiveModel``, switched in two phases, and the last rejection
  (``ServedModel``);
- service.watcher: which version to serve and when: ``models/LATEST`` (service.latest), Redis'
  ``model:current`` (service.pointers), retries with backoff; the admin reload, rollback and
  announcement (``ModelWatcher``);
- service.forward: scoring off the event loop (``ForwardPool``).

``ModelHolder`` starts and stops them together, hands the requests and admin routes what they use,
and describes the served model (``public``, ``describe``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from model import clean_stale_temp
from service.forward import ForwardPool
from service.loader import ActiveModel, ModelLoader, ReloadSource, iso
from service.metrics import Metrics
from service.pointers import RedisPointer
from service.served import ServedModel
from service.settings import Settings
from service.store import FeatureStore
from service.watcher import ModelWatcher

T = TypeVar("T")


class ModelHolder:
    """The served model (``current``), the loader, watcher and forward pool behind it, and what
    the routes ask of them: scoring, admin reloads and rollbacks, the model's description."""

    def __init__(
        self, settings: Settings, store: FeatureStore, metrics: Metrics, fleet: RedisPointer | None = None
    ) -> None:
        self.settings, self.store = settings, store
        self.loader = ModelLoader(settings, store)
        self.served = ServedModel(self.loader, metrics)
        self.watcher = ModelWatcher(settings, self.served, store, metrics, fleet)
        self.forward = ForwardPool(settings)

    # -- the served model ---------------------------------------------------------------------
    @property
    def current(self) -> ActiveModel | None:
        return self.served.current

    @property
    def version_or_none(self) -> str | None:
        return self.served.version_or_none

    async def run_scoring(self, candidates: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` off the event loop unless the request is small (service.forward)."""
        return await self.forward.run(candidates, fn, *args)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        # leftovers of crashed checkpoint writes: off the loop, never waited for (a hung file system)
        threading.Thread(
            target=clean_stale_temp,
            args=(self.settings.artifacts, self.settings.stale_temp_age_s),
            name="mtrank-clean-temp",
            daemon=True,
        ).start()
        self.forward.start()
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        self.forward.stop()

    # -- switching ----------------------------------------------------------------------------
    async def activate(self, version: str, source: ReloadSource) -> ActiveModel:
        """Load, validate and swap in ``version`` (service.served); ReloadError, old model kept."""
        return await self.served.activate(version, source)

    async def check(self) -> None:
        """One watcher round (service.watcher)."""
        await self.watcher.check()

    async def reload_latest(self) -> tuple[ActiveModel, ActiveModel | None]:
        """Activate what LATEST names now: (active, previous)."""
        return await self.watcher.reload_latest()

    async def rollback(self, version: str) -> tuple[ActiveModel, ActiveModel | None, bool]:
        """Serve an existing version and point LATEST at it: (active, previous, latest_updated)."""
        return await self.watcher.rollback(version)

    async def announce(self, version: str) -> bool | None:
        """Redis mode: set model:current to ``version`` and publish it. None without Redis."""
        return await self.watcher.announce(version)

    # -- description ------------------------------------------------------------------------------
    def public(self) -> dict[str, Any]:
        """What anyone may see: the served version, whether one is served, and the request contract
        (heads, the video and context feature names, the weights in force and their bounds).
        Nothing about files, the store or LATEST."""
        active = self.current
        if active is None:
            return {"version": None, "status": "not_ready", "heads": [], "features": {}, "scoring": None}
        schema = active.ranker.schema
        features = {g: [n for cols in schema.columns(g) for n in cols] for g in ("video", "context")}
        return {
            "version": active.version,
            "status": "ready",
            "heads": list(active.heads),
            "features": features,
            "scoring": self._scoring(active),
        }

    def _scoring(self, active: ActiveModel) -> dict[str, Any]:
        """The combination in force, where it comes from (``fitted``, ``settings`` or ``default``),
        the weight bounds, and the combination fitted after training with its validation NDCG."""
        return {
            "combine": active.combine,
            "weights": active.weights,
            "weights_from": active.weights_from,
            "weight_bounds": [self.settings.weight_min, self.settings.weight_max],
            "fitted": _fitted(active.ranker.manifest),
        }

    def describe(self) -> dict[str, Any]:
        """Everything about the served model, its store and the last rejection (admin only: file
        paths, the store's address, what LATEST named)."""
        active = self.current
        out: dict[str, Any] = {"last_reload_error": self.served.last_error}
        if active is None:
            return {"version": None, **out}
        r = active.ranker
        manifest = r.manifest
        return {
            "version": r.version,
            "arch": r.config.model.arch,
            "tasks": [{"name": t.name, "kind": t.kind, "label": t.label} for t in r.tasks],
            "heads": list(active.heads),
            "created_at": manifest.get("created_at"),
            "loaded_at": iso(active.loaded_at),
            "source": active.source,
            "metrics": _finite(manifest.get("metrics", {})),
            "config": r.config.to_dict(),
            "forward": r.backend_info,
            "scoring": self._scoring(active),
            "feature_store": self.store.describe(),
            **out,
        }


def _fitted(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The combination fitted after training and how it did on the validation lists (None: the
    checkpoint has none)."""
    ranking = manifest.get("ranking")
    if not isinstance(ranking, dict) or not isinstance(ranking.get("combination"), dict):
        return None
    out = dict(ranking["combination"])
    out["objective"] = ranking.get("objective")
    out["validation"] = ranking.get("validation")
    return _finite(out)  # type: ignore[no-any-return]


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
