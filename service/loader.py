"""A model version -> a validated, warmed ``ActiveModel`` ready to be served (``ModelLoader``).

Loading knows nothing of *which* version to serve or *when* (service.watcher), nor of the swap
(service.served): it reads and checks the checkpoint, maps it onto the feature store (staged, not
yet live), warms it up and scores a few default rows. Any problem is a ``ReloadError`` and changes
nothing. The blocking steps (checkpoint read, compile, warm-up, test scoring) run in worker threads.

A failure is *transient* (``is_transient``) when trying again later may succeed: the version's
folder, manifest or a file missing, a file shorter than the manifest records (LATEST moved before
the copy was complete), the feature store not ready. Every other one (bad digest or signature,
corrupt or incompatible checkpoint, failed test scoring) is permanent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from model import (
    CheckpointError,
    CheckpointNotFoundError,
    Combine,
    IncompleteCheckpointError,
    Ranker,
    check_version_id,
    combine_for,
    combine_scores,
    resolve_checkpoint,
)
from service.settings import Settings
from service.store import ColumnMap, FeatureStore, StoreError

log = logging.getLogger(__name__)

# what made a version the served one
ReloadSource = Literal["startup", "latest", "redis", "admin-reload", "rollback"]


@dataclass(frozen=True)
class ActiveModel:
    ranker: Ranker
    columns: ColumnMap
    heads: tuple[str, ...]
    loaded_at: float  # epoch seconds
    source: ReloadSource
    # the combined score's default per-head weights and method: the settings', else the combination
    # fitted after training (the checkpoint's), else 1 per head and a product of binary heads / a sum
    weights: dict[str, float]
    combine: Combine
    weights_from: Literal["settings", "fitted", "default"] = "default"

    @property
    def version(self) -> str:
        return self.ranker.version


class ReloadError(Exception):
    """A model version that cannot be served; ``not_found`` when it does not exist at all;
    ``transient`` when trying again later may succeed (files still arriving)."""

    def __init__(
        self, version: str, message: str, *, not_found: bool = False, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.version, self.message, self.not_found, self.transient = version, message, not_found, transient


def iso(ts: float) -> str:
    """Epoch seconds as an ISO 8601 UTC time, to the second (loaded_at, last_reload_error's times)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def is_transient(e: BaseException) -> bool:
    """A failure that may go away without anyone changing the pointer: a version folder, manifest
    or file not there (yet), a file shorter than recorded, the feature store not ready."""
    return isinstance(e, CheckpointNotFoundError | IncompleteCheckpointError | StoreError)


def default_weights(heads: tuple[str, ...], configured: dict[str, float] | None) -> dict[str, float]:
    """The combined score's per-head weights: the configured ones, else 1 for every head of the model."""
    return dict(configured) if configured is not None else dict.fromkeys(heads, 1.0)


def default_scoring(
    ranker: Ranker, settings: Settings
) -> tuple[dict[str, float], Combine, Literal["settings", "fitted", "default"]]:
    """(weights, combine, where they come from) of a model's combined score. The settings'
    weights (MTRANK_WEIGHTS) win; else the combination fitted for the model's objective after
    training, unless MTRANK_COMBINE names another method; else 1 per head (``default_combine``)."""
    heads = tuple(ranker.task_names)
    fitted = ranker.combination
    if settings.weights is not None:
        return dict(settings.weights), default_combine(ranker, settings.combine), "settings"
    if fitted is not None and settings.combine in (None, fitted.method):
        return dict(fitted.weights), fitted.method, "fitted"
    return default_weights(heads, None), default_combine(ranker, settings.combine), "default"


def default_combine(ranker: Ranker, configured: Combine | None) -> Combine:
    """The configured combination, else the product of probabilities when every head is binary and
    the sum otherwise (a regression head's prediction can be 0 or negative: no product of powers)."""
    return configured if configured is not None else combine_for(ranker.tasks)


class ModelLoader:
    """Loads versions from ``settings.artifacts`` onto ``store``; keeps no state between loads."""

    def __init__(self, settings: Settings, store: FeatureStore) -> None:
        self.settings, self.store = settings, store

    async def load(self, version: str, source: ReloadSource) -> ActiveModel:
        """``version`` loaded, checked, mapped onto the store, warmed up and test-scored; ReloadError
        on any problem. What the store staged for it goes live only with ``store.commit``."""
        try:
            # check_version_id first: resolve_checkpoint reads LATEST for an empty version
            check_version_id(version)
            path = await asyncio.to_thread(resolve_checkpoint, self.settings.artifacts, version)
        except CheckpointError as e:  # no such version (or not a version id at all)
            raise ReloadError(version, str(e), not_found=True, transient=is_transient(e)) from e
        key = self.settings.checkpoint_key
        try:
            ranker = await asyncio.to_thread(Ranker.load, path, key.get_secret_value() if key else None)
            if ranker.version != version:
                raise ReloadError(version, f"folder {version} holds a manifest for version {ranker.version}")
            # the compiled forward (model.compiled), checked against eager; eager when it fails
            await asyncio.to_thread(
                ranker.compile, self.settings.forward_backend, self.settings.torch_threads
            )
            heads = tuple(ranker.task_names)
            weights, combine, weights_from = default_scoring(ranker, self.settings)
            missing = sorted(set(weights) - set(heads))
            if missing:
                raise ReloadError(
                    version,
                    f"the configured weights (MTRANK_WEIGHTS) name heads {missing} this model lacks "
                    f"(heads: {list(heads)}); unset them to weigh every head 1",
                )
            columns = await self.store.prepare(ranker.schema, ranker.config.data)
            await asyncio.to_thread(self.validate, ranker, columns)
        except ReloadError:
            raise
        except (CheckpointError, StoreError) as e:  # incl. a version folder with files missing
            raise ReloadError(version, str(e), transient=is_transient(e)) from e
        except Exception as e:  # a bad checkpoint must never take the watcher down
            log.exception("unexpected error loading model %s", version)
            raise ReloadError(version, f"{type(e).__name__}: {e}") from e
        return ActiveModel(ranker, columns, heads, time.time(), source, weights, combine, weights_from)

    def validate(self, ranker: Ranker, columns: ColumnMap) -> None:
        """Warm up, then score a few default rows shaped like the store's: every head finite."""
        ranker.warmup(n=self.settings.warmup_batch, rounds=2)
        n = 8
        ids = [f"__mtrank_probe_{i}" for i in range(n)]
        heads = ranker.score(
            columns.user.defaults(ids[:1]),
            columns.video.defaults(ids),
            ranker.schema.default_rows("context", 1),
        )
        for task in ranker.tasks:
            y = heads.get(task.name)
            if y is None or y.shape != (n,) or not np.isfinite(y).all():
                raise ReloadError(
                    ranker.version, f"test scoring: head {task.name!r} is not {n} finite scores"
                )
            if task.kind == "binary" and ((y < 0) | (y > 1)).any():
                raise ReloadError(ranker.version, f"test scoring: head {task.name!r} is not a probability")
        weights, combine, _ = default_scoring(ranker, self.settings)
        score = combine_scores(heads, weights, combine)
        if not np.isfinite(score).all():
            raise ReloadError(ranker.version, "test scoring: combined scores are not finite")
