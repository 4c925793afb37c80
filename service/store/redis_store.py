"""Redis feature store: one key per entity holding its canonical row as packed bytes.

Keys (``P`` = the prefix, default ``mtrank:``)::

    P u:<user id>       user row:  little-endian int64 categoricals, then float32 numerics
    P v:<video id>      video row: same layout
    P h:<name>:<user>   a user history (``model.sequences``): a sorted set of packed events, score =
                        the event's time, members ordered by (time, item codes), capped at max_len
    P e:<event id>      an event id seen by ``POST /events`` (expires after ``event_id_ttl_s``)
    P meta              JSON: format, column layout (names per group), model version, counts, the
                        histories held (name -> labels, items, max_len)

The fleet's model pointer (``P model:current``, channel ``P model:events``) lives in
``service.pointers``.

``materialize`` writes them (pipelined MSET in chunks; the layout comes from the model's feature
schema; histories from the log, ZADD per user). The request path reads the user and every
candidate with ONE MGET (and, for a model with histories, the user's sorted sets in the same
pipelined round trip), with explicit socket timeouts, redis-py retries disabled and an
``asyncio.wait_for`` deadline; on timeout or connection error every row falls back to defaults
(``degraded``). A small circuit breaker skips Redis for a moment after repeated failures, so an
outage costs no deadline per request; it closes by itself.

``append_events`` (``POST /events``) reads the events' video rows (their side features), then runs
one Lua script per chunk of events: per event, ``SET P e:<id> NX EX ttl`` and, only when the id is
new, per history it qualifies for, ``ZADD`` + ``ZREMRANGEBYRANK`` (trim to max_len). A script runs
atomically, so a reader sees a history before or after an event, never a half-trimmed one.
 On a Redis Cluster a user's history keys and the
event ids carry the hash-tag bucket of the user's row (``P h:{<bucket>}:<name>:<user>``), so one
script's keys share one slot; ``fetch`` then reads the rows and the histories concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
import redis.asyncio as aioredis
import redis.cluster
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from model import (
    CanonicalRows,
    DataConfig,
    DataError,
    FeatureError,
    FeatureSchema,
    SequenceSpec,
    is_event,
    load_checkpoint,
    load_event_tables,
    pack_events,
    resolve_checkpoint,
    unpack_events,
)
from service.store import base
from service.store.tables import load_entity_rows, log_unknown_rates

log = logging.getLogger(__name__)

META_FORMAT = 1
PIPELINE_CHUNKS = 8  # MSETs per round trip when materializing
CONTROL_TIMEOUT_S = 2.0  # meta / model pointer / pub-sub: off the request path
HEALTH_SAMPLE = 100  # entity keys per group that materialize records for the health check
CLUSTER_BUCKETS = 16  # hash-tag buckets of the keys on a Redis Cluster (entity_key)
_GROUP_TAG: dict[base.EntityGroup, str] = {"user": "u", "video": "v"}


def bucket_of(entity_id: str, buckets: int) -> int:
    return zlib.crc32(entity_id.encode()) % buckets


def entity_key(prefix: str, group: base.EntityGroup, entity_id: str, buckets: int = 0) -> str:
    """``P u:<id>``; with ``buckets`` (a Redis Cluster layout) ``P u:{<bucket>}:<id>``, the bucket
    a hash tag: all keys of a bucket share one cluster slot, so a request reads at most
    ``buckets`` + 1 slots, one MGET each, instead of one slot per key."""
    if buckets:
        return f"{prefix}{_GROUP_TAG[group]}:{{{bucket_of(entity_id, buckets)}}}:{entity_id}"
    return f"{prefix}{_GROUP_TAG[group]}:{entity_id}"


def is_cluster(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url`` names a Redis Cluster node (INFO cluster); False when it cannot be asked."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except (RedisError, OSError) as e:
        log.warning(
            "cannot ask %s whether it is a Redis Cluster (%s): taken as a single server", redact_url(url), e
        )
        return False
    finally:
        client.close()


def history_key(prefix: str, name: str, user_id: str, buckets: int = 0) -> str:
    """``P h:<name>:<user>``; on a cluster layout in the bucket (slot) of the user's row."""
    if buckets:
        return f"{prefix}h:{{{bucket_of(user_id, buckets)}}}:{name}:{user_id}"
    return f"{prefix}h:{name}:{user_id}"


def event_key(prefix: str, event_id: str, user_id: str, buckets: int = 0) -> str:
    """``P e:<event id>``; on a cluster layout in the bucket of the event's user."""
    if buckets:
        return f"{prefix}e:{{{bucket_of(user_id, buckets)}}}:{event_id}"
    return f"{prefix}e:{event_id}"


def meta_key(prefix: str) -> str:
    return f"{prefix}meta"


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------------------------
# packed rows


def row_dtype(layout: base.GroupLayout) -> np.dtype[Any]:
    """One packed row: int64 categoricals then float32 numerics, little-endian, no padding."""
    fields: list[tuple[str, str, tuple[int]]] = []
    if layout.cats:
        fields.append(("c", "<i8", (len(layout.cats),)))
    if layout.nums:
        fields.append(("n", "<f4", (len(layout.nums),)))
    dtype = np.dtype(fields)
    assert dtype.itemsize == layout.row_bytes
    return dtype


def pack_rows(rows: CanonicalRows, layout: base.GroupLayout) -> list[bytes]:
    dtype = row_dtype(layout)
    rec = np.empty(len(rows), dtype=dtype)
    if layout.cats:
        rec["c"] = rows.cats
    if layout.nums:
        rec["n"] = rows.nums
    buf, size = rec.tobytes(), dtype.itemsize
    return [buf[i * size : (i + 1) * size] for i in range(len(rows))]


def _fields(rec: np.ndarray, layout: base.GroupLayout) -> tuple[np.ndarray, np.ndarray]:
    n = rec.shape[0]
    cats = rec["c"] if layout.cats else np.zeros((n, 0), dtype=np.int64)
    nums = rec["n"] if layout.nums else np.zeros((n, 0), dtype=np.float32)
    return cats, nums


_NONE = np.zeros(0, dtype=np.intp)


def unpack_rows(
    values: Sequence[bytes | None], ids: Sequence[str], layout: base.GroupLayout, gm: base.GroupMap
) -> tuple[CanonicalRows, np.ndarray, int]:
    """MGET values -> model-layout rows; missing or malformed values get defaults.
    Returns (rows, positions of the missing values (unknown ids), how many were malformed:
    present with the wrong length)."""
    dtype, size = row_dtype(layout), layout.row_bytes
    ok = [v is not None and len(v) == size for v in values]
    n_ok = sum(ok)
    if n_ok == len(values):  # the common case: one join, one frombuffer
        rec = np.frombuffer(b"".join(values), dtype=dtype, count=len(values))  # type: ignore[arg-type]
        return gm.select(*_fields(rec, layout)), _NONE, 0
    out = gm.defaults(ids)
    if n_ok:
        pos = np.flatnonzero(ok)
        found = [values[i] for i in pos.tolist()]
        rec = np.frombuffer(b"".join(found), dtype=dtype, count=n_ok)  # type: ignore[arg-type]
        sel = gm.select(*_fields(rec, layout))
        out.cats[pos], out.nums[pos] = sel.cats, sel.nums
    malformed = sum(1 for v, good in zip(values, ok, strict=True) if v is not None and not good)
    missing = np.array([i for i, v in enumerate(values) if v is None], dtype=np.intp)
    return out, missing, malformed


def parse_meta(raw: bytes | str, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise base.StoreError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise base.StoreError(f"{where}: unsupported meta format (want format {META_FORMAT})")
    meta["layout"] = base.StoreLayout.from_dict(meta.get("layout"))
    held = meta.get("histories", {})
    if not isinstance(held, dict) or not all(isinstance(v, dict) for v in held.values()):
        raise base.StoreError(f"{where}: malformed histories (want name -> definition)")
    meta["histories"] = held
    return meta


# ARGV: the id key's TTL, then per event: how many histories it enters, then per history its cap,
# score and member; KEYS: per event its id key, then its history keys. Returns {new events, duplicates}.
APPEND_EVENTS_LUA = """
local ttl = tonumber(ARGV[1])
local a, k, fresh, dup = 2, 1, 0, 0
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  a = a + 1
  if redis.call('SET', KEYS[k], '1', 'NX', 'EX', ttl) then
    fresh = fresh + 1
    for i = 1, n do
      local key, cap = KEYS[k + i], tonumber(ARGV[a])
      redis.call('ZADD', key, ARGV[a + 1], ARGV[a + 2])
      redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
      a = a + 3
    end
  else
    dup = dup + 1
    a = a + 3 * n
  end
  k = k + 1 + n
end
return {fresh, dup}
"""
EVENTS_PER_SCRIPT = 200  # events per script run: bounds how long Redis is busy with one


# --------------------------------------------------------------------------------------------
# the store

# Redis clients are typed Any: redis-py 8 ships its own annotations, while the stale types-redis
# stubs (if installed) describe redis 4 and shadow them; neither should break type checking here.
RedisClient = Any


def async_client(url: str, timeout_s: float, cluster: bool = False) -> RedisClient:
    """redis.asyncio client with explicit socket timeouts and redis-py's retries disabled; for a
    cluster, a RedisCluster client that follows the slot map (one retry: a MOVED reply or a failed
    node makes it re-read the map, e.g. after a failover)."""
    opts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if cluster:
        return RedisCluster.from_url(
            url, retry=AsyncRetry(NoBackoff(), 1), require_full_coverage=False, **opts
        )
    opts |= {"retry": AsyncRetry(NoBackoff(), 0), "retry_on_timeout": False, "health_check_interval": 0}
    return aioredis.Redis.from_url(url, **opts)


@dataclass
class _UnknownWindow:
    """Unknown users / videos over the last ``size`` requests, against the materialised expectation."""

    size: int
    margin: float
    requests: int = 0
    users: int = 0
    videos: int = 0
    unknown_users: int = 0
    unknown_videos: int = 0
    rates: dict[str, float] = field(default_factory=dict)  # of the last complete window
    alarm: str | None = None  # which group's rate is too high, with the numbers

    def add(self, unknown_users: int, videos: int, unknown_videos: int, expected: dict[str, float]) -> None:
        self.requests += 1
        self.users, self.unknown_users = self.users + 1, self.unknown_users + unknown_users
        self.videos, self.unknown_videos = self.videos + videos, self.unknown_videos + unknown_videos
        if self.requests < self.size:
            return
        self.rates = {
            "user": self.unknown_users / self.users,
            "video": self.unknown_videos / max(self.videos, 1),
        }
        high = [
            f"{g} {rate:.0%} (expected {expected.get(g, 0.0):.0%})"
            for g, rate in self.rates.items()
            if rate > expected.get(g, 0.0) + self.margin
        ]
        alarm = "unknown-rate far above the materialised data's: " + ", ".join(high) if high else None
        if alarm and not self.alarm:
            log.error("feature store: %s; responses are marked degraded (unknown_rate)", alarm)
        elif self.alarm and not alarm:
            log.info("feature store: unknown-rate back to normal (%s)", self.rates)
        self.alarm = alarm
        self.requests = self.users = self.videos = self.unknown_users = self.unknown_videos = 0


class RedisStore:
    kind = "redis"

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        timeout_s: float = 0.03,
        breaker_failures: int = 3,
        breaker_reset_s: float = 1.0,
        min_present: float = 0.5,
        unknown_rate_window: int = 200,
        unknown_rate_margin: float = 0.3,
        cluster: bool = False,
        event_id_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        self.url, self.prefix = url, prefix
        self._event_ttl = event_id_ttl_s
        self._append_script: Any = None
        self.cluster = cluster
        self._timeout = timeout_s
        # the request path: the deadline below is the contract
        self._fast = async_client(url, timeout_s, cluster)
        self._control = async_client(url, CONTROL_TIMEOUT_S, cluster)  # meta, health
        self._buckets = 0  # the key layout's hash-tag buckets (meta key_buckets), read with the meta
        self._user_prefix = f"{prefix}{_GROUP_TAG['user']}:"
        self._video_prefix = f"{prefix}{_GROUP_TAG['video']}:"
        self._layouts: dict[str, base.StoreLayout] = {}  # layout_id -> layout, for every mapped model
        self._meta: dict[str, Any] | None = None
        self._breaker_failures, self._breaker_reset = breaker_failures, breaker_reset_s
        self._failures = 0
        self._open_until = 0.0
        self._layout_warned = False  # rows in another layout: logged once, counted per request
        # health (check_health, every watcher round): the meta key and a sample of entity keys
        self._min_present = min_present
        self.problem: str | None = None  # "meta_missing" | "evicted": degraded responses, not ready
        self.problem_detail: str | None = None
        self.present_ratio: float | None = None  # of the meta's sampled entity keys, last check
        self._expected: dict[str, float] = {}  # unknown-rate per group the materialised data implies
        self._unknown = _UnknownWindow(unknown_rate_window, unknown_rate_margin)

    # -- model preparation (off the request path) --------------------------------------------
    async def read_meta(self) -> dict[str, Any] | None:
        raw = await asyncio.wait_for(self._control.get(meta_key(self.prefix)), CONTROL_TIMEOUT_S)
        return None if raw is None else parse_meta(raw, f"Redis key {meta_key(self.prefix)!r}")

    async def prepare(self, schema: FeatureSchema, data: DataConfig) -> base.ColumnMap:
        try:
            meta = await self.read_meta()
        except (RedisError, OSError, TimeoutError) as e:
            if self._meta is None:
                raise base.StoreError(
                    f"cannot read {meta_key(self.prefix)!r} from Redis: {e or type(e).__name__}"
                ) from e
            log.warning("Redis unreachable (%s): mapping the model onto the last known layout", e)
            meta = self._meta
        if meta is None:
            raise base.StoreError(
                f"Redis has no {meta_key(self.prefix)!r}: run `mtrank materialize` (prefix {self.prefix!r})"
            )
        layout: base.StoreLayout = meta["layout"]
        self._buckets = _buckets(meta)
        self._expected = _expected_rates(meta.get("expected_unknown"))
        columns = base.build_column_map(schema, layout, f"the Redis feature store (prefix {self.prefix!r})")
        held = meta["histories"]
        lacking = [q.name for q in schema.sequences if held.get(q.name) != q.definition()]
        if lacking:
            raise base.StoreError(
                f"the Redis feature store (prefix {self.prefix!r}) holds no histories {lacking} as this "
                "model defines them: run `mtrank materialize` for it"
            )
        self._layouts[columns.layout_id] = layout
        self._meta = meta
        return columns

    def commit(self, columns: base.ColumnMap) -> None:
        """Nothing to make live: every column map keeps reading with the layout it was built on."""

    # -- request path -------------------------------------------------------------------------
    async def fetch(self, user_id: str, video_ids: Sequence[str], columns: base.ColumnMap) -> base.Fetched:
        if time.monotonic() < self._open_until:
            return self._degraded(user_id, video_ids, columns, "breaker_open")
        try:
            values, members = await asyncio.wait_for(
                self._read(user_id, video_ids, columns.sequences), self._timeout
            )
        except (TimeoutError, RedisTimeoutError):
            return self._failed(user_id, video_ids, columns, "timeout")
        except (RedisConnectionError, OSError):
            return self._failed(user_id, video_ids, columns, "connection")
        except RedisError as e:
            log.warning("feature fetch failed: %s", e)
            return self._failed(user_id, video_ids, columns, "error")
        self._failures = 0
        layout = self._layouts[columns.layout_id]
        user, unknown_user, bad_user = unpack_rows(values[:1], (user_id,), layout.user, columns.user)
        videos, unknown, bad_videos = unpack_rows(values[1:], video_ids, layout.video, columns.video)
        n_user, n_videos = int(unknown_user.size), int(unknown.size)
        if bad_user or bad_videos:  # rows in another layout (re-materialised without a model reload?)
            if not self._layout_warned:
                self._layout_warned = True
                log.warning(
                    "feature rows in another layout than the model's (%d of %d): served with defaults",
                    bad_user + bad_videos,
                    len(values),
                )
            return base.Fetched(user, videos, n_user, n_videos, True, "layout_mismatch", unknown)
        history, broken = self._histories(members, columns.sequences)
        if broken:
            return base.Fetched(user, videos, n_user, n_videos, True, "history_malformed", unknown, history)
        self._unknown.add(n_user, len(video_ids), n_videos, self._expected)
        reason = self.problem or ("unknown_rate" if self._unknown.alarm else None)
        return base.Fetched(user, videos, n_user, n_videos, reason is not None, reason, unknown, history)

    async def _read(
        self, user_id: str, video_ids: Sequence[str], sequences: Sequence[SequenceSpec]
    ) -> tuple[list[bytes | None], list[list[bytes]]]:
        """The rows (``_read_rows``) and each history's latest max_len events: on one server in the
        same pipelined round trip; on a cluster concurrently."""
        if not sequences:
            return await self._read_rows(user_id, video_ids), []
        keys = [history_key(self.prefix, q.name, user_id, self._buckets) for q in sequences]
        if self.cluster:
            rows, *members = await asyncio.gather(
                self._read_rows(user_id, video_ids),
                *(self._fast.zrange(k, -q.max_len, -1) for q, k in zip(sequences, keys, strict=True)),
            )
            return rows, [list(m) for m in members]
        up, vp = self._user_prefix, self._video_prefix
        pipe = self._fast.pipeline(transaction=False)
        pipe.mget([up + user_id, *[vp + v for v in video_ids]])
        for q, k in zip(sequences, keys, strict=True):
            pipe.zrange(k, -q.max_len, -1)
        out = await pipe.execute()
        return list(out[0]), [list(m) for m in out[1:]]

    def _histories(
        self, members: list[list[bytes]], sequences: Sequence[SequenceSpec]
    ) -> tuple[dict[str, np.ndarray] | None, bool]:
        """Sorted-set members -> canonical codes per history; an unreadable one (another layout)
        is served empty and flagged."""
        if not sequences:
            return None, False
        out, broken = {}, False
        for q, got in zip(sequences, members, strict=True):
            try:
                out[q.name] = unpack_events(got, q.width)[1]
            except ValueError:
                broken = True
                out[q.name] = np.zeros((0, q.width), dtype=np.int64)
        if broken and not self._layout_warned:
            self._layout_warned = True
            log.warning("history members of another layout than the model's: served empty histories")
        return out, broken

    async def _read_rows(self, user_id: str, video_ids: Sequence[str]) -> list[bytes | None]:
        """The user's row, then every video's, in order (None: no such key). One MGET on a single
        server; on a cluster one MGET per slot (hash-tag bucket), all of them in one pipeline that
        redis-py sends to each node at once."""
        if not self.cluster:
            up, vp = self._user_prefix, self._video_prefix
            return list(await self._fast.mget([up + user_id, *[vp + v for v in video_ids]]))
        return await _mget_by_slot(
            self._fast,
            [
                entity_key(self.prefix, "user", user_id, self._buckets),
                *[entity_key(self.prefix, "video", v, self._buckets) for v in video_ids],
            ],
        )

    def _failed(
        self, user_id: str, video_ids: Sequence[str], columns: base.ColumnMap, reason: str
    ) -> base.Fetched:
        self._failures += 1
        if self._failures >= self._breaker_failures:
            if time.monotonic() >= self._open_until:
                log.warning(
                    "Redis feature store failing (%s, %d in a row): default features for %.1fs",
                    reason,
                    self._failures,
                    self._breaker_reset,
                )
            self._open_until = time.monotonic() + self._breaker_reset
        return self._degraded(user_id, video_ids, columns, reason)

    def _degraded(
        self, user_id: str, video_ids: Sequence[str], columns: base.ColumnMap, reason: str
    ) -> base.Fetched:
        return base.Fetched(
            columns.user.defaults((user_id,)),
            columns.video.defaults(video_ids),
            unknown_users=0,  # not known to be unknown: the store did not answer
            unknown_videos=0,
            degraded=True,
            degraded_reason=reason,
            history={q.name: np.zeros((0, q.width), dtype=np.int64) for q in columns.sequences} or None,
        )

    # -- events -------------------------------------------------------------------------------------
    async def append_events(self, events: Sequence[base.Event]) -> base.EventsResult:
        """See the module doc. base.StoreError when Redis cannot take them now (nothing half-written:
        a chunk's script runs whole or not at all; retrying is safe, ids make it idempotent)."""
        try:
            meta = self._meta if self._meta is not None else await self.read_meta()
            if meta is None:
                raise base.StoreError(f"Redis has no {meta_key(self.prefix)!r}: run `mtrank materialize`")
            try:
                held = {name: SequenceSpec.of_definition(name, d) for name, d in meta["histories"].items()}
            except FeatureError as e:
                raise base.StoreError(f"Redis key {meta_key(self.prefix)!r}: {e}") from e
            buckets = _buckets(meta)
            out = base.EventsResult(appended=dict.fromkeys(held, 0))
            video_codes = await self._event_videos(events, held.values(), meta["layout"].video, buckets)
            if self._append_script is None:
                self._append_script = self._control.register_script(APPEND_EVENTS_LUA)
            by_slot: dict[int, list[base.Event]] = {}  # one script's keys share a slot on a cluster
            for ev in events:
                by_slot.setdefault(bucket_of(ev.user_id, buckets) if buckets else 0, []).append(ev)
            for group in by_slot.values():
                for i in range(0, len(group), EVENTS_PER_SCRIPT):
                    keys, argv = self._script_args(
                        group[i : i + EVENTS_PER_SCRIPT], held, video_codes, buckets, out
                    )
                    fresh, dup = await asyncio.wait_for(
                        self._append_script(keys=keys, args=argv), CONTROL_TIMEOUT_S
                    )
                    out.accepted, out.duplicates = out.accepted + int(fresh), out.duplicates + int(dup)
        except (RedisError, OSError, TimeoutError) as e:
            raise base.StoreError(f"Redis did not take the events ({e or type(e).__name__})") from e
        return out

    def _script_args(
        self,
        events: Sequence[base.Event],
        held: dict[str, SequenceSpec],
        video_codes: dict[str, dict[str, int]],
        buckets: int,
        out: base.EventsResult,
    ) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        argv: list[Any] = [str(self._event_ttl)]
        for ev in events:
            entries = []
            for q in held.values():
                if is_event(ev.labels, q.labels):
                    codes = base.event_codes(q, ev, video_codes.get(ev.video_id, {}))
                    (member,) = pack_events(np.array([ev.timestamp]), codes[None, :])
                    entries.append((history_key(self.prefix, q.name, ev.user_id, buckets), q, member))
            keys.append(event_key(self.prefix, ev.event_id, ev.user_id, buckets))
            argv.append(str(len(entries)))
            for key, q, member in entries:
                keys.append(key)
                argv += [str(q.max_len), repr(float(ev.timestamp)), member]
                out.appended[q.name] += 1
        return keys, argv

    async def _event_videos(
        self,
        events: Sequence[base.Event],
        held: Iterable[SequenceSpec],
        layout: base.GroupLayout,
        buckets: int,
    ) -> dict[str, dict[str, int]]:
        """The canonical side-feature codes of the events' videos, from their rows (one MGET)."""
        side = sorted({c for q in held for c in q.items[1:] if c in layout.cats})
        if not side:
            return {}
        ids = list(dict.fromkeys(ev.video_id for ev in events))
        keys = [entity_key(self.prefix, "video", v, buckets) for v in ids]
        read = _mget_by_slot(self._control, keys) if self.cluster else self._control.mget(keys)
        raw = await asyncio.wait_for(read, CONTROL_TIMEOUT_S)
        dtype, size = row_dtype(layout), layout.row_bytes
        out: dict[str, dict[str, int]] = {}
        for v, value in zip(ids, raw, strict=True):
            if value is None or len(value) != size:
                continue
            cats = _fields(np.frombuffer(value, dtype=dtype, count=1), layout)[0][0]
            out[v] = {c: int(cats[layout.cats.index(c)]) for c in side}
        return out

    # -- health -------------------------------------------------------------------------------
    async def check_health(self) -> str | None:
        """Probe what a wipe or an eviction takes away: the meta key, and the entity keys it samples.

        Sets ``problem`` ("meta_missing", "evicted" or None) and returns it; logs each change. An
        unreachable Redis changes nothing here (that is the breaker's business: degraded, not empty).
        """
        try:
            meta = await self.read_meta()
            sample = meta.get("sample") if meta is not None else None
            buckets = _buckets(meta) if meta is not None else 0
            keys = [
                entity_key(self.prefix, g, str(i), buckets) for g, ids in _sample_ids(sample) for i in ids
            ]
            present = await asyncio.wait_for(self._count_present(keys), CONTROL_TIMEOUT_S) if keys else 0
        except (RedisError, OSError, TimeoutError) as e:
            log.debug("feature store health check skipped: %s", e)
            return self.problem
        except base.StoreError as e:
            meta, keys, present = None, [], 0
            log.debug("feature store meta unreadable: %s", e)
        problem, detail = None, None
        if meta is None:
            problem = "meta_missing"
            detail = (
                f"Redis has no {meta_key(self.prefix)!r} (wiped, restarted empty or evicted): "
                f"every row is served with defaults; run `mtrank materialize` (prefix {self.prefix!r})"
            )
            self.present_ratio = None
        else:
            self._expected = _expected_rates(meta.get("expected_unknown"))
            self.present_ratio = present / len(keys) if keys else None
            if self.present_ratio is not None and self.present_ratio < self._min_present:
                problem = "evicted"
                detail = (
                    f"only {present} of {len(keys)} sampled feature keys are in Redis (evicted or "
                    f"deleted; want >= {self._min_present:.0%}): run `mtrank materialize` and check "
                    "Redis' maxmemory / eviction policy"
                )
        if problem != self.problem:
            if problem is not None:
                log.error("feature store %s: %s", problem, detail)
            else:
                log.info("feature store healthy again (%s was %s)", self.prefix, self.problem)
        self.problem, self.problem_detail = problem, detail
        return problem

    async def _count_present(self, keys: Sequence[str]) -> int:
        if not self.cluster:
            return int(await self._control.exists(*keys))
        return sum(v is not None for v in await _mget_by_slot(self._control, keys))

    def unknown_rates(self) -> dict[str, float]:
        """Unknown users / videos of the last complete window of requests."""
        return dict(self._unknown.rates)

    def health_gauges(self) -> tuple[float | None, dict[str, float]]:
        return self.present_ratio, self.unknown_rates()

    # -- misc ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        meta = dict(self._meta or {})
        layout = meta.pop("layout", None)
        return {
            "kind": self.kind,
            "url": redact_url(self.url),
            "prefix": self.prefix,
            "cluster": self.cluster,
            "key_buckets": self._buckets,
            "timeout_ms": self._timeout * 1000,
            "meta": meta,
            "columns": layout.to_dict() if isinstance(layout, base.StoreLayout) else None,
            "breaker_open": time.monotonic() < self._open_until,
            "health": {
                "problem": self.problem,
                "detail": self.problem_detail,
                "sampled_keys_present": self.present_ratio,
                "unknown_rate": self.unknown_rates(),
                "expected_unknown_rate": self._expected,
                "unknown_rate_alarm": self._unknown.alarm,
            },
        }

    async def close(self) -> None:
        for client in (self._fast, self._control):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


async def _mget_by_slot(client: RedisClient, keys: Sequence[str]) -> list[bytes | None]:
    """MGET on a cluster (a multi-key command must stay in one slot): redis-py's mget_nonatomic
    sends one MGET per slot, in one pipeline per node, to all nodes at once."""
    return list(await client.mget_nonatomic(keys))


def _buckets(meta: dict[str, Any]) -> int:
    k = meta.get("key_buckets", 0)
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else 0


def _sample_ids(sample: Any) -> list[tuple[base.EntityGroup, list[Any]]]:
    if not isinstance(sample, dict):
        return []
    return [(g, ids) for g in base.ENTITY_GROUPS if isinstance(ids := sample.get(g), list)]


def _expected_rates(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {g: float(v) for g, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# offline: materialize


@dataclass
class MaterializeReport:
    version: str
    prefix: str
    counts: dict[str, int]
    layout: base.StoreLayout
    seconds: float
    replicas: tuple[int, int] = (0, 0)  # (acknowledged the writes, connected) over every primary


REPLICA_WAIT_MS = 10_000


def await_replicas(client: RedisClient, timeout_ms: int = REPLICA_WAIT_MS) -> tuple[int, int]:
    """Block until each primary's connected replicas acknowledge every write so far (``WAIT``).

    Replication is asynchronous: a primary that fails over before its replica has the writes
    loses them (the meta key among them: every row served with defaults). Returns
    (replicas that acknowledged, replicas connected), summed over the primaries.
    """
    targets: list[Any] = [None]
    if isinstance(client, redis.cluster.RedisCluster):
        targets = client.get_primaries()  # type: ignore[no-untyped-call]
    acked = total = 0
    for node in targets:
        kw: dict[str, Any] = {} if node is None else {"target_nodes": node}
        info: dict[str, Any] = client.info("replication", **kw)
        if "role" not in info:  # a reply keyed by node name
            info = next(iter(info.values()))
        want = int(info.get("connected_slaves", 0))
        if want:
            acked += min(want, int(client.wait(want, timeout_ms, **kw)))
        total += want
    return acked, total


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


def _write_histories(
    client: RedisClient,
    prefix: str,
    data: DataConfig,
    q: SequenceSpec,
    data_dir: Path | None,
    chunk: int,
    buckets: int,
) -> int:
    """Each user's latest events of one history from the log, merged into their sorted sets (an
    event already held is the same member: written once) and trimmed; returns the users written."""
    try:
        (table,) = load_event_tables(data, [q], data_dir).values()
    except DataError as e:
        raise base.StoreError(f"history {q.name!r}: {e}") from e
    pipe = client.pipeline(transaction=False)
    for i, user in enumerate(table.users):
        h = table.history(i)
        key = history_key(prefix, q.name, user, buckets)
        pipe.zadd(key, dict(zip(pack_events(h.times, h.codes), h.times.tolist(), strict=True)))
        pipe.zremrangebyrank(key, 0, -(q.max_len + 1))
        if (i + 1) % chunk == 0:
            pipe.execute()
    pipe.execute()
    log.info("materialized %s histories of %d users from %s", q.name, len(table.users), table.source)
    return len(table.users)


def delete_prefix(client: RedisClient, prefix: str, batch: int = 1000) -> int:
    """Delete every key starting with ``prefix`` (SCAN + UNLINK); returns how many."""
    n, keys = 0, []
    for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            n += int(client.unlink(*keys))
            keys = []
    if keys:
        n += int(client.unlink(*keys))
    return n


def materialize(
    artifacts: str | Path,
    *,
    redis_url: str,
    prefix: str = "mtrank:",
    version: str | None = None,
    data_dir: Path | None = None,
    chunk_size: int = 1000,
    replace: bool = False,
    cluster: bool | None = None,
    cluster_buckets: int = CLUSTER_BUCKETS,
) -> MaterializeReport:
    """Write every user and video row of a model's tables into Redis, then the meta key.

    The column layout is the model's (``schema.columns(group)``). A prefix that already holds a
    different layout is refused unless ``replace`` (which first deletes the prefix's entity keys).
    On a Redis Cluster (``cluster``; None = ask the server) the keys carry ``cluster_buckets``
    hash-tag buckets (``entity_key``), recorded in the meta as ``key_buckets``.
    Raises CheckpointError, base.StoreError or redis errors.
    """
    t0 = time.perf_counter()
    ckpt = load_checkpoint(resolve_checkpoint(artifacts, version))
    layout = base.StoreLayout.of_schema(ckpt.schema)
    cluster = is_cluster(redis_url) if cluster is None else cluster
    buckets = cluster_buckets if cluster else 0
    opts: dict[str, Any] = {"socket_timeout": 60, "socket_connect_timeout": 5}
    client: RedisClient = (
        redis.cluster.RedisCluster.from_url(redis_url, **opts)
        if cluster
        else redis.Redis.from_url(redis_url, **opts)
    )
    try:
        raw = client.get(meta_key(prefix))
        held: dict[str, Any] = {}
        if raw is not None and not replace:
            old = parse_meta(raw, f"Redis key {meta_key(prefix)!r}")
            if old["layout"] != layout:
                raise base.StoreError(
                    f"prefix {prefix!r} holds another column layout (model {old.get('model_version')}); "
                    "materialize into a new prefix, or pass --replace (services re-read the layout "
                    "when they load a model)"
                )
            held = dict(old["histories"])
            clash = [
                q.name for q in ckpt.schema.sequences if held.get(q.name, q.definition()) != q.definition()
            ]
            if clash:
                raise base.StoreError(
                    f"prefix {prefix!r} holds histories {clash} of another definition; materialize into "
                    "a new prefix, or pass --replace"
                )
        if replace:
            for tag in (*_GROUP_TAG.values(), "h"):
                delete_prefix(client, f"{prefix}{tag}:")
        counts: dict[str, int] = {}
        entity_ids: dict[str, list[str]] = {}
        rng = random.Random(ckpt.version)  # the health-check sample: reproducible per model version
        for g in base.ENTITY_GROUPS:
            ent = load_entity_rows(ckpt.config.data, g, layout.group(g), data_dir)
            entity_ids[g] = ent.ids
            values = pack_rows(ent.rows, layout.group(g))
            pipe = None if cluster else client.pipeline(transaction=False)
            for n, i in enumerate(range(0, len(values), chunk_size), start=1):
                keys = [entity_key(prefix, g, k, buckets) for k in ent.ids[i : i + chunk_size]]
                chunk = dict(zip(keys, values[i : i + chunk_size], strict=True))
                if pipe is None:
                    client.mset_nonatomic(chunk)  # one MSET per slot, pipelined per node
                    continue
                pipe.mset(chunk)
                if n % PIPELINE_CHUNKS == 0:
                    pipe.execute()
            if pipe is not None:
                pipe.execute()
            counts[g + "s"] = len(values)
            log.info("materialized %d %ss from %s", len(values), g, ent.source)
        for q in ckpt.schema.sequences:
            counts[f"{q.name} histories"] = _write_histories(
                client, prefix, ckpt.config.data, q, data_dir, chunk_size, buckets
            )
            held[q.name] = q.definition()
        meta = {
            "format": META_FORMAT,
            "layout": layout.to_dict(),
            "layout_id": layout.layout_id,
            "key_buckets": buckets,
            "model_version": ckpt.version,
            "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "counts": counts,
            # services probe these keys to notice a wipe or an eviction (RedisStore.check_health)
            "sample": {g: rng.sample(ids, min(len(ids), HEALTH_SAMPLE)) for g, ids in entity_ids.items()},
            # what share of the logged impressions name a user / video without a row: the
            # unknown-rate the data implies (None when the log cannot be read)
            "expected_unknown": log_unknown_rates(ckpt.config.data, entity_ids, data_dir),
            "histories": held,
        }
        client.set(meta_key(prefix), json.dumps(meta))
        replicas = await_replicas(client)
        if replicas[0] < replicas[1]:
            log.warning(
                "only %d of %d replicas acknowledged the materialized keys within %.0fs: a failover "
                "now can lose some of them",
                *replicas,
                REPLICA_WAIT_MS / 1000,
            )
    finally:
        client.close()
    return MaterializeReport(ckpt.version, prefix, counts, layout, time.perf_counter() - t0, replicas)
