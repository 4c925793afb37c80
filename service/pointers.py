"""The fleet's model pointers: which version every worker and replica serves.

Two records decide it (``served_version``, the same way in every process):

- ``models/LATEST`` in the artifacts folder (``model.read_latest`` / ``write_latest``; read off the
  event loop by service.latest): what a training run promoted;
- with the Redis store, ``<prefix>model:current`` (``FleetPointer``), set by an admin reload or
  rollback and announced on the channel ``<prefix>model:events`` (``RedisPointer``), so that every
  worker and replica acts on it at once.

The feature store holds features; this module holds the pointer, on its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from service.loader import ReloadSource
from service.settings import Settings
from service.store import FeatureStore, RedisStore
from service.store.redis_store import CONTROL_TIMEOUT_S, async_client

log = logging.getLogger(__name__)


def pointer_key(prefix: str) -> str:
    return f"{prefix}model:current"


def events_channel(prefix: str) -> str:
    return f"{prefix}model:events"


@dataclass(frozen=True)
class FleetPointer:
    """``model:current``: the version an admin reload or rollback chose for the fleet, and what
    ``models/LATEST`` named at that moment (``latest``; None in a pointer written as a bare version
    id by an older release). ``served_version`` decides with it which version every replica serves."""

    version: str
    latest: str | None

    def dump(self) -> str:
        return json.dumps({"version": self.version, "latest": self.latest})

    @classmethod
    def parse(cls, raw: bytes | str) -> FleetPointer | None:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        text = text.strip()
        if not text.startswith("{"):
            return cls(text, None) if text else None  # an older release's bare version id
        try:
            d = json.loads(text)
        except ValueError:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("version"), str):
            return None
        latest = d.get("latest")
        return cls(d["version"], latest if isinstance(latest, str) else None)


class RedisPointer:
    """``model:current`` and ``model:events`` under a key prefix, on a client of its own."""

    def __init__(self, url: str, prefix: str, *, cluster: bool = False) -> None:
        self.prefix = prefix
        self._client = async_client(url, CONTROL_TIMEOUT_S, cluster)

    async def read(self) -> tuple[bool, FleetPointer | None]:
        """(answered, ``model:current``): (True, None) when it is unset, (False, None) when Redis
        cannot be asked (the caller keeps what it knew)."""
        try:
            raw = await asyncio.wait_for(self._client.get(pointer_key(self.prefix)), CONTROL_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as e:
            log.debug("cannot read %s: %s", pointer_key(self.prefix), e)
            return False, None
        return True, None if raw is None else FleetPointer.parse(raw)

    async def announce(self, version: str, latest: str | None) -> bool:
        """Set ``model:current`` to ``version`` (and what LATEST names now) and publish it; False
        when Redis is unreachable."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(pointer_key(self.prefix), FleetPointer(version, latest).dump())
                pipe.publish(events_channel(self.prefix), version)
                await asyncio.wait_for(pipe.execute(), CONTROL_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as e:
            log.warning("cannot announce model %s in Redis: %s", version, e)
            return False
        return True

    async def listen(self, wake: asyncio.Event) -> None:
        """Set ``wake`` whenever a version is published; reconnects by itself (run as a task)."""
        delay, warned = 0.5, False
        while True:
            pubsub = self._client.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(events_channel(self.prefix)), CONTROL_TIMEOUT_S)
                if warned:
                    log.info("model pub/sub reconnected")
                delay, warned = 0.5, False
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        wake.set()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as e:
                if not warned:
                    log.warning("model pub/sub unavailable (%s): retrying", e or type(e).__name__)
                    warned = True
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def open_pointer(settings: Settings, store: FeatureStore) -> RedisPointer | None:
    """The fleet pointer that goes with the store: Redis' with the Redis store, else none (LATEST
    alone decides)."""
    if not isinstance(store, RedisStore):
        return None
    return RedisPointer(settings.redis_url, settings.redis_prefix, cluster=store.cluster)


def served_version(latest: str | None, pointer: FleetPointer | None) -> tuple[str, ReloadSource, bool] | None:
    """The version to serve: (version, source, whether it overrides ``model:current``), or None.

    ``latest``: what models/LATEST names (None: missing or unusable); ``pointer``: Redis'
    ``model:current`` (None: no Redis, or never set). The pointer wins while LATEST still names
    what it named when the pointer was set (a pointer of an older release, without that record,
    always wins); a LATEST moved since is a newer decision (a training run promoted a version).
    """
    if pointer is None:
        return (latest, "latest", False) if latest is not None else None
    if pointer.latest is None or latest is None or latest == pointer.latest:
        return pointer.version, "redis", False
    return latest, "latest", True
