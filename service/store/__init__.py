"""Feature stores: one interface (``FeatureStore``), two backends (embedded, Redis)."""

from __future__ import annotations

from service.settings import Settings
from service.store.base import ColumnMap, Event, EventsResult, FeatureStore, Fetched, StoreError, StoreLayout
from service.store.embedded import EmbeddedStore
from service.store.redis_store import RedisStore, is_cluster

__all__ = [
    "ColumnMap",
    "EmbeddedStore",
    "Event",
    "EventsResult",
    "FeatureStore",
    "Fetched",
    "RedisStore",
    "StoreError",
    "StoreLayout",
    "open_store",
]


def open_store(settings: Settings) -> EmbeddedStore | RedisStore:
    """The store the settings ask for (nothing is read until a model is prepared)."""
    if settings.feature_store == "redis":
        return RedisStore(
            settings.redis_url,
            settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            breaker_failures=settings.redis_breaker_failures,
            breaker_reset_s=settings.redis_breaker_reset_s,
            min_present=settings.store_min_present,
            unknown_rate_window=settings.unknown_rate_window,
            unknown_rate_margin=settings.unknown_rate_margin,
            cluster=settings.redis_cluster
            if settings.redis_cluster is not None
            else is_cluster(settings.redis_url),
            event_id_ttl_s=settings.event_id_ttl_s,
        )
    return EmbeddedStore(settings.data_dir, settings.event_ids)
