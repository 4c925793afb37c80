"""In-process feature store: the user / video tables as numpy matrices (no Redis needed).

Built from the tables of the first model's data config (or ``Settings.data_dir``); a later model
that needs more columns makes the store re-read the tables with those columns appended, off the
request path. The wider tables are only staged: they replace the live ones in ``commit``, once that
model is accepted, so a rejected model never changes what the serving one reads. Columns only ever
get appended (their positions never change), and a column map reads only its own columns, so a
request still in flight on the previous model reads the new tables correctly too.
Lookups are dict gets plus one numpy fancy-indexing per group.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from model import CanonicalRows, DataConfig, FeatureSchema
from service.store.base import (
    ENTITY_GROUPS,
    ColumnMap,
    EntityGroup,
    Fetched,
    GroupLayout,
    GroupMap,
    StoreLayout,
    build_column_map,
)
from service.store.tables import load_entity_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Table:
    """One group: id -> row, and the rows with one trailing all-missing default row."""

    index: dict[str, int]
    cats: np.ndarray  # (N + 1, C) int64
    nums: np.ndarray  # (N + 1, F) float32
    layout: GroupLayout
    source: str

    def lookup(self, ids: Sequence[str], gm: GroupMap) -> tuple[CanonicalRows, np.ndarray]:
        """Rows of ``ids`` (defaults for unknown ones) and the positions of the unknown ones."""
        default = len(self.index)
        rows = np.fromiter(map(self.index.get, ids, repeat(default, len(ids))), dtype=np.intp, count=len(ids))
        out = gm.take(self.cats, self.nums, rows)
        unknown = np.flatnonzero(rows == default)
        gm.hash_ids(out, unknown, ids)
        return out, unknown


def _layout_of(tables: dict[EntityGroup, _Table]) -> StoreLayout | None:
    if len(tables) < len(ENTITY_GROUPS):
        return None
    return StoreLayout(tables["user"].layout, tables["video"].layout)


def _build_table(layout: GroupLayout, ids: list[str], rows: CanonicalRows, source: str) -> _Table:
    cats = np.zeros((len(ids) + 1, len(layout.cats)), dtype=np.int64)
    nums = np.full((len(ids) + 1, len(layout.nums)), np.nan, dtype=np.float32)
    cats[:-1], nums[:-1] = rows.cats, rows.nums
    return _Table({k: i for i, k in enumerate(ids)}, cats, nums, layout, source)


class EmbeddedStore:
    kind = "embedded"
    problem: str | None = None  # in-process tables are never wiped or evicted
    problem_detail: str | None = None

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = data_dir
        self._tables: dict[EntityGroup, _Table] = {}  # live: what fetch reads
        self._staged: tuple[str, dict[EntityGroup, _Table]] | None = None  # (layout id, tables)
        self._lock = asyncio.Lock()

    @property
    def layout(self) -> StoreLayout | None:
        return _layout_of(self._tables)

    async def prepare(self, schema: FeatureSchema, data: DataConfig) -> ColumnMap:
        async with self._lock:
            self._staged = None  # a model prepared earlier and never committed was rejected
            need = StoreLayout.of_schema(schema)
            tables, grew = dict(self._tables), False
            for g in ENTITY_GROUPS:
                have = tables.get(g)
                want = need.group(g)
                if (
                    have is not None
                    and set(want.cats) <= set(have.layout.cats)
                    and set(want.nums) <= set(have.layout.nums)
                ):
                    continue
                # keep the columns (and their positions) the current model uses, append the new ones
                base = have.layout if have is not None else GroupLayout(want.key, (), ())
                grown = GroupLayout(
                    want.key,
                    base.cats + tuple(c for c in want.cats if c not in base.cats),
                    base.nums + tuple(c for c in want.nums if c not in base.nums),
                )
                ent = await asyncio.to_thread(load_entity_rows, data, g, grown, self._data_dir)
                tables[g] = await asyncio.to_thread(_build_table, grown, ent.ids, ent.rows, ent.source)
                grew = True
                log.info("embedded store: %d %ss from %s (staged)", len(ent.ids), g, ent.source)
            layout = _layout_of(tables)
            assert layout is not None
            columns = build_column_map(schema, layout, "the embedded feature store")
            if grew:
                self._staged = (columns.layout_id, tables)
            return columns

    def commit(self, columns: ColumnMap) -> None:
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] == columns.layout_id:
            self._tables = staged[1]  # one reference assignment: fetch sees the old or the new dict
        elif self.layout is None or self.layout.layout_id != columns.layout_id:
            raise RuntimeError("embedded store: commit of a column map that was not just prepared")

    async def fetch(self, user_id: str, video_ids: Sequence[str], columns: ColumnMap) -> Fetched:
        users, videos = self._tables["user"], self._tables["video"]
        user, unknown_user = users.lookup((user_id,), columns.user)
        vids, unknown = videos.lookup(video_ids, columns.video)
        return Fetched(user, vids, int(unknown_user.size), int(unknown.size), unknown_positions=unknown)

    async def check_health(self) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tables": {
                g: {"rows": len(t.index), "source": t.source, "columns": t.layout.to_dict()}
                for g, t in self._tables.items()
            },
        }

    async def close(self) -> None:
        self._tables, self._staged = {}, None
