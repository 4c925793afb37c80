"""In-process feature store: the user / video tables as numpy matrices (no Redis needed).

Built from the tables of the first model's data config (or ``Settings.data_dir``); a later model
that needs more columns makes the store re-read the tables with those columns appended, off the
request path. The wider tables are only staged: they replace the live ones in ``commit``, once that
model is accepted, so a rejected model never changes what the serving one reads. Columns only ever
get appended (their positions never change), and a column map reads only its own columns, so a
request still in flight on the previous model reads the new tables correctly too.
Lookups are dict gets plus one numpy fancy-indexing per group.

User histories (``model.sequences``) are built from the log when a model that reads them is
prepared (``model.data.history.load_event_tables``: each user's latest events), staged and made
live with the tables. A history of the same name and definition is kept across models, with the
events posted to it (``append_events``). Posted events are idempotent by event id (the last
``event_ids`` ids are remembered) and by content (an event already in a history is not added
again); each update replaces one user's arrays, so a request reads the old or the new history.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from model import (
    CanonicalRows,
    DataConfig,
    DataError,
    FeatureSchema,
    SequenceSpec,
    UserHistory,
    is_event,
    load_event_tables,
)
from service.store import base
from service.store.tables import load_entity_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Table:
    """One group: id -> row, and the rows with one trailing all-missing default row."""

    index: dict[str, int]
    cats: np.ndarray  # (N + 1, C) int64
    nums: np.ndarray  # (N + 1, F) float32
    layout: base.GroupLayout
    source: str

    def lookup(self, ids: Sequence[str], gm: base.GroupMap) -> tuple[CanonicalRows, np.ndarray]:
        """Rows of ``ids`` (defaults for unknown ones) and the positions of the unknown ones."""
        default = len(self.index)
        rows = np.fromiter(map(self.index.get, ids, repeat(default, len(ids))), dtype=np.intp, count=len(ids))
        out = gm.take(self.cats, self.nums, rows)
        unknown = np.flatnonzero(rows == default)
        gm.hash_ids(out, unknown, ids)
        return out, unknown


@dataclass
class _History:
    """One sequence's histories: user id -> their latest events."""

    spec: SequenceSpec
    users: dict[str, UserHistory]
    source: str
    empty: UserHistory = field(init=False)

    def __post_init__(self) -> None:
        self.empty = UserHistory.empty(self.spec.width)


def _build_histories(
    data: DataConfig, specs: list[SequenceSpec], data_dir: Path | None
) -> dict[str, _History]:
    try:
        tables = load_event_tables(data, specs, data_dir)
    except (DataError, OSError) as e:
        raise base.StoreError(f"user histories: {e}") from e
    by_name = {q.name: q for q in specs}
    return {name: _History(by_name[name], t.as_dict(), t.source) for name, t in tables.items()}


def _layout_of(tables: dict[base.EntityGroup, _Table]) -> base.StoreLayout | None:
    if len(tables) < len(base.ENTITY_GROUPS):
        return None
    return base.StoreLayout(tables["user"].layout, tables["video"].layout)


def _build_table(layout: base.GroupLayout, ids: list[str], rows: CanonicalRows, source: str) -> _Table:
    cats = np.zeros((len(ids) + 1, len(layout.cats)), dtype=np.int64)
    nums = np.full((len(ids) + 1, len(layout.nums)), np.nan, dtype=np.float32)
    cats[:-1], nums[:-1] = rows.cats, rows.nums
    return _Table({k: i for i, k in enumerate(ids)}, cats, nums, layout, source)


class EmbeddedStore:
    kind = "embedded"
    problem: str | None = None  # in-process tables are never wiped or evicted
    problem_detail: str | None = None

    def __init__(self, data_dir: Path | None = None, event_ids: int = 1_000_000) -> None:
        self._data_dir = data_dir
        self._tables: dict[base.EntityGroup, _Table] = {}  # live: what fetch reads
        self._histories: dict[str, _History] = {}  # live, by sequence name
        # (layout id, tables, histories) of the model prepared last, until it is committed
        self._staged: tuple[str, dict[base.EntityGroup, _Table], dict[str, _History]] | None = None
        self._building: list[base.Event] | None = None  # events posted while histories are being built
        self._seen: OrderedDict[str, None] = OrderedDict()  # event ids, the latest ``event_ids``
        self._max_seen = event_ids
        self._lock = asyncio.Lock()

    @property
    def layout(self) -> base.StoreLayout | None:
        return _layout_of(self._tables)

    async def prepare(self, schema: FeatureSchema, data: DataConfig) -> base.ColumnMap:
        async with self._lock:
            self._staged = None  # a model prepared earlier and never committed was rejected
            need = base.StoreLayout.of_schema(schema)
            tables, grew = dict(self._tables), False
            for g in base.ENTITY_GROUPS:
                have = tables.get(g)
                want = need.group(g)
                if (
                    have is not None
                    and set(want.cats) <= set(have.layout.cats)
                    and set(want.nums) <= set(have.layout.nums)
                ):
                    continue
                # keep the columns (and their positions) the current model uses, append the new ones
                kept = have.layout if have is not None else base.GroupLayout(want.key, (), ())
                grown = base.GroupLayout(
                    want.key,
                    kept.cats + tuple(c for c in want.cats if c not in kept.cats),
                    kept.nums + tuple(c for c in want.nums if c not in kept.nums),
                )
                ent = await asyncio.to_thread(load_entity_rows, data, g, grown, self._data_dir)
                tables[g] = await asyncio.to_thread(_build_table, grown, ent.ids, ent.rows, ent.source)
                grew = True
                log.info("embedded store: %d %ss from %s (staged)", len(ent.ids), g, ent.source)
            layout = _layout_of(tables)
            assert layout is not None
            columns = base.build_column_map(schema, layout, "the embedded feature store")
            histories, built = dict(self._histories), False
            todo = [q for q in schema.sequences if not self._holds(q)]
            if todo:
                self._building = []
                try:
                    new = await asyncio.to_thread(_build_histories, data, todo, self._data_dir)
                    for ev in self._building:  # posted while the log was read
                        self._apply(ev, new.values(), tables["video"], base.EventsResult())
                finally:
                    self._building = None
                for name, h in new.items():
                    log.info(
                        "embedded store: %s histories of %d users from %s (staged)",
                        name,
                        len(h.users),
                        h.source,
                    )
                histories.update(new)
                built = True
            if grew or built:
                self._staged = (columns.layout_id, tables, histories)
            return columns

    def _holds(self, q: SequenceSpec) -> bool:
        live = self._histories.get(q.name)
        return live is not None and live.spec.definition() == q.definition()

    def commit(self, columns: base.ColumnMap) -> None:
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == columns.layout_id:
            # one reference assignment each: fetch sees the old or the new dicts
            self._tables, self._histories = staged[1], staged[2]
        elif self.layout is None or self.layout.layout_id != columns.layout_id:
            raise RuntimeError("embedded store: commit of a column map that was not just prepared")
        if not all(self._holds(q) for q in columns.sequences):
            raise RuntimeError("embedded store: commit of a model whose histories were not prepared")

    async def fetch(self, user_id: str, video_ids: Sequence[str], columns: base.ColumnMap) -> base.Fetched:
        users, videos = self._tables["user"], self._tables["video"]
        user, unknown_user = users.lookup((user_id,), columns.user)
        vids, unknown = videos.lookup(video_ids, columns.video)
        history, missing = None, False
        if columns.sequences:
            history = {}
            for q in columns.sequences:
                h = self._histories.get(q.name)
                if h is None:  # not held (commit makes sure it is): an empty history, flagged
                    missing = True
                    history[q.name] = np.zeros((0, q.width), dtype=np.int64)
                else:
                    history[q.name] = h.users.get(user_id, h.empty).codes
        return base.Fetched(
            user,
            vids,
            int(unknown_user.size),
            int(unknown.size),
            missing,
            "history_missing" if missing else None,
            unknown_positions=unknown,
            history=history,
        )

    # -- events -----------------------------------------------------------------------------------
    async def append_events(self, events: Sequence[base.Event]) -> base.EventsResult:
        if "video" not in self._tables:
            raise base.StoreError("no model loaded yet: the store holds no histories")
        out = base.EventsResult(appended=dict.fromkeys(self._histories, 0))
        live = list(self._histories.values())
        staged: list[_History] = []  # built for a model not yet committed (live ones are shared)
        staged_videos = self._tables["video"]
        if self._staged is not None:
            staged = [h for h in self._staged[2].values() if all(h is not g for g in live)]
            staged_videos = self._staged[1]["video"]
        for ev in events:
            if ev.event_id in self._seen:
                out.duplicates += 1
                self._seen.move_to_end(ev.event_id)
                continue
            self._seen[ev.event_id] = None
            if len(self._seen) > self._max_seen:
                self._seen.popitem(last=False)
            out.accepted += 1
            self._apply(ev, live, self._tables["video"], out)
            self._apply(ev, staged, staged_videos, base.EventsResult())
            if self._building is not None:
                self._building.append(ev)
        return out

    @staticmethod
    def _apply(ev: base.Event, histories: Iterable[_History], videos: _Table, out: base.EventsResult) -> None:
        """Add one event to every history it qualifies for."""
        row = videos.index.get(ev.video_id, len(videos.index))  # unknown video: the default row
        for h in histories:
            q = h.spec
            if not is_event(ev.labels, q.labels):
                continue
            cols = videos.layout.cats
            side = {c: int(videos.cats[row, cols.index(c)]) for c in q.items[1:] if c in cols}
            codes = base.event_codes(q, ev, side)
            old = h.users.get(ev.user_id, h.empty)
            h.users[ev.user_id] = old.add(np.array([ev.timestamp]), codes[None, :], q.max_len)
            out.appended[q.name] = out.appended.get(q.name, 0) + 1

    async def check_health(self) -> str | None:
        return None

    def health_gauges(self) -> None:
        return None  # in-process tables are never wiped or evicted

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tables": {
                g: {"rows": len(t.index), "source": t.source, "columns": t.layout.to_dict()}
                for g, t in self._tables.items()
            },
            "histories": {
                name: {"users": len(h.users), "source": h.source, **h.spec.definition()}
                for name, h in self._histories.items()
            },
        }

    async def close(self) -> None:
        self._tables, self._histories, self._staged = {}, {}, None
