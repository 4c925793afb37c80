"""The feature-store interface and what every backend shares.

A store keeps canonical rows (``model.features``: categorical = stable int64 hash, numeric = raw
float32) for users and videos, in *its own* column layout (the columns it was built or
materialised with). When a model is loaded, ``prepare`` maps the model's columns onto the
store's (``ColumnMap``); ``fetch`` then returns rows in the model's column order, exactly the
model's columns whatever else the store holds. A model that needs a column the store lacks is
rejected at load time, never at request time. ``prepare`` never changes what the serving model
reads: anything it stages takes effect with ``commit``, called once the new model is accepted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from model import CanonicalRows, DataConfig, FeatureSchema, SequenceSpec, stable_hash

EntityGroup = Literal["user", "video"]
ENTITY_GROUPS: tuple[EntityGroup, ...] = ("user", "video")


class StoreError(Exception):
    """The store cannot serve a model (missing columns, unreadable tables, no Redis meta)."""


@dataclass(frozen=True)
class GroupLayout:
    """Columns a store holds for one group: categorical names, then numeric names."""

    key: str
    cats: tuple[str, ...]
    nums: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "cats": list(self.cats), "nums": list(self.nums)}

    @classmethod
    def from_dict(cls, d: Any) -> GroupLayout:
        if not isinstance(d, dict):
            raise StoreError("malformed store layout: a group must be an object")
        try:
            key, cats, nums = d["key"], d["cats"], d["nums"]
        except KeyError as e:
            raise StoreError(f"malformed store layout: missing {e}") from None
        if not (
            isinstance(key, str)
            and isinstance(cats, list)
            and isinstance(nums, list)
            and all(isinstance(c, str) for c in [*cats, *nums])
        ):
            raise StoreError("malformed store layout: key must be a string, cats/nums lists of strings")
        return cls(key, tuple(cats), tuple(nums))

    @property
    def row_bytes(self) -> int:
        """Size of one packed row: int64 categoricals then float32 numerics."""
        return 8 * len(self.cats) + 4 * len(self.nums)


@dataclass(frozen=True)
class StoreLayout:
    user: GroupLayout
    video: GroupLayout

    def group(self, g: EntityGroup) -> GroupLayout:
        return self.user if g == "user" else self.video

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user.to_dict(), "video": self.video.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> StoreLayout:
        if not isinstance(d, dict):
            raise StoreError("malformed store layout: not an object")
        return cls(GroupLayout.from_dict(d.get("user")), GroupLayout.from_dict(d.get("video")))

    @property
    def layout_id(self) -> str:
        raw = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def of_schema(cls, schema: FeatureSchema) -> StoreLayout:
        """The columns a model needs from a store."""
        parts = {}
        for g in ENTITY_GROUPS:
            cats, nums = schema.columns(g)
            key = schema.key_of(g)
            assert key is not None
            parts[g] = GroupLayout(key, tuple(cats), tuple(nums))
        return cls(parts["user"], parts["video"])


@dataclass(frozen=True)
class GroupMap:
    """Where a model's columns of one group sit in the store's rows."""

    # store column of each model categorical; None = the store's first n_cats columns, in order
    # (the store may hold more columns after them: those are never read)
    cat_idx: np.ndarray | None
    num_idx: np.ndarray | None  # the same for the numerics (None = the first n_nums)
    key_col: int | None  # model categorical column holding the entity id (hashed), if it is a feature
    n_cats: int
    n_nums: int

    def select(self, cats: np.ndarray, nums: np.ndarray) -> CanonicalRows:
        """Store-layout rows -> model-layout rows (always fresh, writable arrays)."""
        return self.take(cats, nums, None)

    def take(self, cats: np.ndarray, nums: np.ndarray, rows: np.ndarray | None) -> CanonicalRows:
        """``rows`` (None: all) of store-layout matrices -> model-layout rows (fresh arrays)."""
        return CanonicalRows(
            _pick(cats, rows, self.cat_idx, self.n_cats).astype(np.int64, copy=False),
            _pick(nums, rows, self.num_idx, self.n_nums).astype(np.float32, copy=False),
        )

    def defaults(self, ids: Sequence[str]) -> CanonicalRows:
        """Rows for entities the store does not know: all features missing, the id column hashed."""
        rows = CanonicalRows(
            np.zeros((len(ids), self.n_cats), dtype=np.int64),
            np.full((len(ids), self.n_nums), np.nan, dtype=np.float32),
        )
        self.hash_ids(rows, np.arange(len(ids)), ids)
        return rows

    def hash_ids(self, rows: CanonicalRows, positions: np.ndarray, ids: Sequence[str]) -> None:
        """Set the id column of ``rows[positions]`` to the stable hash of ``ids[positions]``."""
        if self.key_col is not None and positions.size:
            rows.cats[positions, self.key_col] = [stable_hash(ids[i]) for i in positions.tolist()]


def _pick(matrix: np.ndarray, rows: np.ndarray | None, idx: np.ndarray | None, n: int) -> np.ndarray:
    """``matrix[rows][:, idx]``, or its first ``n`` columns when ``idx`` is None: always a copy."""
    out: np.ndarray
    if rows is None:
        out = matrix[:, idx] if idx is not None else np.array(matrix[:, :n])
    elif idx is not None:
        out = matrix[np.ix_(rows, idx)]
    else:
        out = matrix[rows] if matrix.shape[1] == n else matrix[rows, :n]
    return out


@dataclass(frozen=True)
class ColumnMap:
    user: GroupMap
    video: GroupMap
    layout_id: str
    sequences: tuple[SequenceSpec, ...] = ()  # the user histories the model reads

    def group(self, g: EntityGroup) -> GroupMap:
        return self.user if g == "user" else self.video


def build_column_map(schema: FeatureSchema, layout: StoreLayout, where: str) -> ColumnMap:
    """Map a model's columns onto a store layout; StoreError naming every missing column."""
    maps: dict[EntityGroup, GroupMap] = {}
    missing: list[str] = []
    for g in ENTITY_GROUPS:
        have = layout.group(g)
        cats, nums = schema.columns(g)
        pos_c = {c: i for i, c in enumerate(have.cats)}
        pos_n = {c: i for i, c in enumerate(have.nums)}
        missing += [f"{g}.{c} (categorical)" for c in cats if c not in pos_c]
        missing += [f"{g}.{c} (numeric)" for c in nums if c not in pos_n]
        if missing:
            continue
        ci = np.array([pos_c[c] for c in cats], dtype=np.intp)
        ni = np.array([pos_n[c] for c in nums], dtype=np.intp)
        key = schema.key_of(g)
        maps[g] = GroupMap(
            cat_idx=None if ci.tolist() == list(range(len(cats))) else ci,
            num_idx=None if ni.tolist() == list(range(len(nums))) else ni,
            key_col=cats.index(key) if key in cats else None,
            n_cats=len(cats),
            n_nums=len(nums),
        )
    if missing:
        raise StoreError(f"{where} lacks feature columns the model needs: {', '.join(missing)}")
    return ColumnMap(maps["user"], maps["video"], layout.layout_id, tuple(schema.sequences))


@dataclass
class Fetched:
    """Feature rows of one request, in the model's column order."""

    user: CanonicalRows  # 1 row
    videos: CanonicalRows  # one row per candidate, in request order
    unknown_users: int
    unknown_videos: int
    degraded: bool = False
    degraded_reason: str | None = None
    # candidate positions the store has no row for; None when the store did not answer (degraded)
    unknown_positions: np.ndarray | None = None
    # the user's histories the model reads: sequence -> canonical item codes (L, K), oldest first
    # (an empty one for a user without events; None when the model has no sequences)
    history: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Event:
    """One piece of feedback (``POST /events``): the user engaged with a video at ``timestamp`` (in
    the unit of the log's time column) with these labels; ``features`` are inline video features
    (values of history side features the store does not hold)."""

    event_id: str
    user_id: str
    video_id: str
    timestamp: float
    labels: Mapping[str, float]
    features: Mapping[str, Any]


@dataclass
class EventsResult:
    accepted: int = 0  # events not seen before (by event id)
    duplicates: int = 0  # events whose id was seen before: nothing changed
    appended: dict[str, int] = field(default_factory=dict)  # per history: events added to it


def event_codes(spec: SequenceSpec, event: Event, video_codes: Mapping[str, int]) -> np.ndarray:
    """An event's item codes (K,) for a history: the video id's hash, then each side feature's
    canonical code: the event's inline value if it sends one, else the store's (``video_codes``,
    0 = missing)."""
    out = np.zeros(spec.width, dtype=np.int64)
    out[0] = stable_hash(event.video_id)
    for k, name in enumerate(spec.items[1:], start=1):
        out[k] = stable_hash(event.features[name]) if name in event.features else video_codes.get(name, 0)
    return out


class FeatureStore(Protocol):
    """One interface, two backends (``EmbeddedStore``, ``RedisStore``)."""

    kind: str
    problem: str | None  # a data problem check_health found (e.g. "meta_missing"): not ready
    problem_detail: str | None

    async def prepare(self, schema: FeatureSchema, data: DataConfig) -> ColumnMap:
        """Map a model onto the store (off the request path); StoreError if it cannot.

        Never changes what ``fetch`` returns for the maps already handed out: whatever the new
        model needs (e.g. more columns) is staged until ``commit``.
        """
        ...

    def commit(self, columns: ColumnMap) -> None:
        """The model prepared with ``columns`` is accepted: make what was staged for it live.

        Synchronous, so that the caller swaps the model in right after it, with no request in
        between. Maps handed out earlier keep reading exactly their own columns.
        """
        ...

    async def fetch(self, user_id: str, video_ids: Sequence[str], columns: ColumnMap) -> Fetched:
        """Rows of one user and B videos. Never raises for unknown ids or backend outages."""
        ...

    async def check_health(self) -> str | None:
        """Look for data a wipe or an eviction took away (off the request path); sets ``problem``."""
        ...

    def health_gauges(self) -> tuple[float | None, dict[str, float]] | None:
        """(share of the sampled entity keys present at the last check, unknown-id rate per group
        over the last window) for the metrics; None for a store that has no such health."""
        ...

    async def append_events(self, events: Sequence[Event]) -> EventsResult:
        """Append feedback to the user histories the store keeps (idempotent by event id): the next
        ``fetch`` sees it. StoreError when the store cannot record them now (nothing was lost:
        the caller may retry)."""
        ...

    def describe(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...
