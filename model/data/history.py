"""User behaviour histories from the log (``model.sequences``): for training and for the stores.

**Training** (``build_histories``, a pass of ``prepare`` after the fit): every encoded row gets, per
sequence feature, the embedding indices of its user's last ``max_len`` events with an earlier
time (``seq.<name>.items`` (N, K) int32, oldest first, and ``seq.<name>.len``). The pass

1. reads the user key, time, label and item columns of *every* fragment (under ``torchrun`` each
   rank reads the whole log here: a row's history needs all of its user's earlier events, wherever
   they are in the log), and spills this process's rows and every event to ``PARTITIONS`` files by
   the user's hash;
2. per partition (one user lives in one partition), sorts the events by (user, time, item codes),
   keeps the first of each (user, time, video), and finds each row's events before its time with
   one ``searchsorted``; the results go to per-fragment memory-mapped arrays that the encode pass
   reads back row for row.

Memory is bounded by one partition (the log / ``PARTITIONS``), never the whole log; disk holds the
spilled columns and the histories until the shards are written.

**Serving** (``load_event_tables``): every user's latest ``max_len`` events as canonical codes,
streamed from the log with memory bounded by users x ``max_len`` (the events are compacted as they
are read). The embedded store builds its histories with it; ``mtrank materialize`` writes them
into Redis. Both use the same event rules as training (``model.sequences``), so a row's history
offline is what ``/rank`` sees once the events before it were logged or posted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from model.config import DataConfig
from model.data.source import DataError, EntityTable, LogSource
from model.features import NULL_CODE, FeatureSchema, SequenceSpec, canonical_str, hash_column
from model.sequences import EventTable, event_order, first_of_each_event

if TYPE_CHECKING:
    from model.data.prepare import Preparer

log = logging.getLogger(__name__)

PARTITIONS = 16
COMPACT_EVENTS = 1 << 20  # serving: compact the events read so far past this many
_ROW_DTYPE = np.dtype([("user", "<i8"), ("time", "<f8"), ("frag", "<i8"), ("row", "<i8")])


def _event_dtype(width: int) -> np.dtype[Any]:
    return np.dtype([("user", "<i8"), ("time", "<f8"), ("codes", "<i8", (width,)), ("idx", "<i4", (width,))])


def items_key(name: str) -> str:
    return f"seq.{name}.items"


def len_key(name: str) -> str:
    return f"seq.{name}.len"


def event_mask(df: pd.DataFrame, labels: Sequence[str]) -> np.ndarray:
    """Rows whose label column(s) hold a number > 0 (any of them)."""
    out = np.zeros(len(df), dtype=bool)
    for c in labels:
        col = df[c]
        if col.dtype.kind not in "biuf":
            raise DataError(f"history label column {c!r} holds {col.dtype} values, not numbers")
        out |= col.to_numpy(dtype=np.float64, na_value=np.nan) > 0
    return out


def row_times(col: pd.Series) -> np.ndarray:
    """The time column as float64 (NaN = no time): histories compare times as float64."""
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def check_columns(
    d: DataConfig, specs: Sequence[SequenceSpec], columns: Sequence[str], tables: Sequence[str] = ()
) -> None:
    """DataError naming what the histories need and the log (or the videos table) lacks."""
    have = set(columns)
    need = [c for c in (d.user_key, d.video_key, d.time_column) if c]
    need += [c for s in specs for c in s.labels]
    missing = sorted({c for c in need if c not in have})
    if missing:
        raise DataError(
            f"data.sequences need the log column(s) {missing} (user key, video key, time, labels)"
        )
    side = sorted({c for s in specs for c in s.items[1:] if c not in have and c not in tables})
    if side:
        raise DataError(f"history side features {side} are not columns of the log or of the videos table")


class _ItemColumns:
    """Canonical codes of the item features of a log batch: joined from the videos table by key,
    else the log's column."""

    def __init__(self, table: EntityTable | None, names: Sequence[str]) -> None:
        self.table, self.names = table, list(dict.fromkeys(names))

    def log_columns(self) -> list[str]:
        held = set(self.table.cats) if self.table is not None else set()
        cols = [c for c in self.names if c not in held]
        return cols + ([self.table.key] if self.table is not None else [])

    def codes(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        rows = self.table.locate(hash_column(df[self.table.key]).codes) if self.table is not None else None
        out = {}
        for name in self.names:
            if self.table is not None and name in self.table.cats:
                assert rows is not None
                out[name] = self.table.cat_codes(name, rows)
            else:
                out[name] = hash_column(df[name]).codes
        return out


# --------------------------------------------------------------------------------------------
# training


class HistoryIndex:
    """Each row's histories (per fragment, memory-mapped), read back by the encode pass."""

    def __init__(self, root: Path, specs: Sequence[SequenceSpec], frag_rows: dict[int, int]) -> None:
        self.root, self.specs, self.frag_rows = root, list(specs), dict(frag_rows)
        self._maps: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def maps(self, spec: SequenceSpec, frag: int, create: bool = False) -> tuple[np.ndarray, np.ndarray]:
        key = (spec.name, frag)
        if key not in self._maps:
            n = self.frag_rows.get(frag, 0)
            base = self.root / f"{len(self._maps):05d}"
            mode = "w+" if create else "r"
            items = np.lib.format.open_memmap(
                f"{base}.items.npy", mode=mode, dtype=np.int32, shape=(n, spec.max_len, spec.width)
            )
            lens = np.lib.format.open_memmap(f"{base}.len.npy", mode=mode, dtype=np.int32, shape=(n,))
            self._maps[key] = (items, lens)
        return self._maps[key]

    def arrays(self, frag: int, row0: int, n: int) -> dict[str, np.ndarray]:
        """The shard arrays of rows row0 .. row0 + n of a fragment."""
        out: dict[str, np.ndarray] = {}
        for s in self.specs:
            if (s.name, frag) in self._maps:
                items, lens = self._maps[(s.name, frag)]
                out[items_key(s.name)] = np.array(items[row0 : row0 + n])
                out[len_key(s.name)] = np.array(lens[row0 : row0 + n])
            else:  # no row of this fragment has a user, a time or an event before it
                out[items_key(s.name)] = np.zeros((n, s.max_len, s.width), np.int32)
                out[len_key(s.name)] = np.zeros(n, np.int32)
        return out

    def flush(self) -> None:
        for items, lens in self._maps.values():
            for m in (items, lens):
                if isinstance(m, np.memmap):
                    m.flush()


def build_histories(
    prep: Preparer, schema: FeatureSchema, root: Path, frag_rows: dict[int, int]
) -> HistoryIndex:
    """The histories of this process's rows (see the module doc), as a ``HistoryIndex`` under ``root``."""
    d, specs = prep.d, schema.sequences
    assert d.user_key and d.video_key
    tables = [c for t in prep.tables.values() for c in t.columns]
    check_columns(d, specs, prep.log_columns, tables)
    item_names = [c for s in specs for c in s.items]
    items = _ItemColumns(prep.tables.get("video"), item_names)
    labels = [c for s in specs for c in s.labels]
    cols = list(dict.fromkeys([d.user_key, d.time_column, *labels, *items.log_columns()]))
    by_name = {f.name: f for f in schema.cats("video")}
    own = {f.index for f in prep.frags}
    files: dict[str, Any] = {}

    def spill(kind: str, part: np.ndarray, rec: np.ndarray) -> None:
        for p in np.unique(part).tolist():
            name = f"{kind}-{p:02d}.bin"
            if name not in files:
                files[name] = (root / name).open("ab")
            files[name].write(rec[part == p].tobytes())

    events_seen = dict.fromkeys((s.name for s in specs), 0)
    try:
        for frag, row0, df in prep.batches(cols, prep.source.fragments):
            n = len(df)
            users = hash_column(df[d.user_key]).codes
            times = row_times(df[d.time_column])
            ok = prep.kept(frag, row0, n) & (users != NULL_CODE) & np.isfinite(times)
            part = (users.view(np.uint64) >> np.uint64(60)).astype(np.int64) % PARTITIONS
            if frag.index in own and ok.any():
                rec = np.empty(int(ok.sum()), dtype=_ROW_DTYPE)
                rec["user"], rec["time"], rec["frag"] = users[ok], times[ok], frag.index
                rec["row"] = np.arange(row0, row0 + n)[ok]
                spill("rows", part[ok], rec)
            codes = items.codes(df)
            for k, s in enumerate(specs):
                ev = ok & event_mask(df, s.labels)
                if not ev.any():
                    continue
                erec = np.empty(int(ev.sum()), dtype=_event_dtype(s.width))
                erec["user"], erec["time"] = users[ev], times[ev]
                for j, name in enumerate(s.items):
                    c = codes[name][ev]
                    erec["codes"][:, j] = c
                    erec["idx"][:, j] = by_name[name].encode_codes(c)
                events_seen[s.name] += len(erec)
                spill(f"events{k}", part[ev], erec)
    finally:
        for f in files.values():
            f.close()
    index = HistoryIndex(root, specs, frag_rows)
    for p in range(PARTITIONS):
        rows_path = root / f"rows-{p:02d}.bin"
        if not rows_path.exists():
            continue
        rows = np.fromfile(rows_path, dtype=_ROW_DTYPE)
        for k, s in enumerate(specs):
            path = root / f"events{k}-{p:02d}.bin"
            ev = np.fromfile(path, dtype=_event_dtype(s.width)) if path.exists() else None
            items_arr, lens = _histories(rows, ev, s.max_len, s.width)
            for f in np.unique(rows["frag"]).tolist():
                sel = rows["frag"] == f
                m_items, m_lens = index.maps(s, int(f), create=True)
                m_items[rows["row"][sel]] = items_arr[sel]
                m_lens[rows["row"][sel]] = lens[sel]
    index.flush()
    log.info("histories: %s events (user, time, video de-duplicated per sequence later)", events_seen)
    return index


def _histories(
    rows: np.ndarray, ev: np.ndarray | None, max_len: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row (one partition's), the encoded items (R, N, K) of its user's latest ``max_len``
    events strictly before its time, and their number (R,)."""
    r = len(rows)
    if ev is None or len(ev) == 0:
        return np.zeros((r, max_len, width), np.int32), np.zeros(r, np.int32)
    ev = ev[event_order(ev["user"], ev["time"], ev["codes"])]
    ev = ev[first_of_each_event(ev["user"], ev["time"], ev["codes"])]
    _, inv_u = np.unique(np.concatenate([ev["user"], rows["user"]]), return_inverse=True)
    times, inv_t = np.unique(np.concatenate([ev["time"], rows["time"]]), return_inverse=True)
    n_t = np.int64(len(times))
    comp = inv_u.astype(np.int64) * n_t + inv_t.astype(np.int64)  # (user, time) as one ordered key
    e_comp, r_comp = comp[: len(ev)], comp[len(ev) :]
    r_user = inv_u[len(ev) :].astype(np.int64)
    hi = np.searchsorted(e_comp, r_comp, side="left")  # events of earlier users, or earlier times
    lo = np.searchsorted(e_comp, r_user * n_t, side="left")  # the user's first event
    n = np.minimum(hi - lo, max_len)
    idx = (hi - n)[:, None] + np.arange(max_len)[None, :]  # (R, N)
    valid = np.arange(max_len)[None, :] < n[:, None]
    items = ev["idx"][idx.clip(0, len(ev) - 1)]  # (R, N, K)
    items[~valid] = 0
    return items.astype(np.int32), n.astype(np.int32)


# --------------------------------------------------------------------------------------------
# serving


def load_event_tables(
    data: DataConfig,
    specs: Sequence[SequenceSpec],
    data_dir: str | Path | None = None,
    *,
    keep_all: bool = False,
) -> dict[str, EventTable]:
    """Per sequence, every user's latest events in the log (see the module doc); with ``keep_all``
    every event, not only the latest ``max_len`` (histories as of any time, for a replay).
    ``data_dir`` overrides the config's for the log and the videos table. DataError when they
    cannot be read."""
    if not specs:
        return {}
    if data_dir is not None:
        data = dataclasses.replace(data, data_dir=str(data_dir))
    assert data.user_key and data.video_key
    source = LogSource(data, data.read_batch_rows)
    table = None
    if data.videos is not None:
        side = sorted({c for s in specs for c in s.items[1:]})
        table = EntityTable(data.path(data.videos), data.video_key, side, [])
    check_columns(data, specs, source.columns(), table.columns if table is not None else [])
    items = _ItemColumns(table, [c for s in specs for c in s.items])
    labels = [c for s in specs for c in s.labels]
    cols = list(dict.fromkeys([data.user_key, data.time_column, *labels, *items.log_columns()]))
    acc = {s.name: _Accumulator(s, None if keep_all else s.max_len) for s in specs}
    for df in _log_batches(source, cols):
        users = hash_column(df[data.user_key])
        times = row_times(df[data.time_column])
        ok = (users.codes != NULL_CODE) & np.isfinite(times)
        codes = items.codes(df)
        for s in specs:
            ev = ok & event_mask(df, s.labels)
            if ev.any():
                c = np.stack([codes[name][ev] for name in s.items], axis=1)
                acc[s.name].add(users.codes[ev], times[ev], c, users)
    src = str(data.path(data.log))
    return {name: a.result(src) for name, a in acc.items()}


def _log_batches(source: LogSource, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
    for frag in source.fragments:
        yield from source.batches(frag, columns)


class _Accumulator:
    """Events of one sequence, compacted to each user's latest ``cap`` (None: all) as they come."""

    def __init__(self, spec: SequenceSpec, cap: int | None) -> None:
        self.spec, self.cap = spec, cap
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending = 0
        self.names: dict[int, str] = {}
        self.read = 0

    def add(self, users: np.ndarray, times: np.ndarray, codes: np.ndarray, hashed: Any) -> None:
        for code, s in zip(hashed.uniq_codes.tolist(), hashed.uniq_strings, strict=True):
            self.names.setdefault(code, s)
        self.parts.append((users, times, codes))
        self.pending += len(users)
        self.read += len(users)
        if self.cap is not None and self.pending > COMPACT_EVENTS:  # uncapped: once, at the end
            self._compact()

    def _compact(self) -> None:
        if not self.parts:
            return
        u = np.concatenate([p[0] for p in self.parts])
        t = np.concatenate([p[1] for p in self.parts])
        c = np.concatenate([p[2] for p in self.parts])
        order = event_order(u, t, c)
        u, t, c = u[order], t[order], c[order]
        keep = first_of_each_event(u, t, c)
        u, t, c = u[keep], t[keep], c[keep]
        if self.cap is None:
            self.parts, self.pending = [(u, t, c)], 0
            return
        # the latest max_len per user: position from each user's end
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(u)]
        from_end = np.repeat(ends, np.diff(np.r_[starts, len(u)])) - np.arange(len(u))
        last = from_end <= self.cap
        self.parts = [(u[last], t[last], c[last])]
        self.pending = int(last.sum())

    def result(self, source: str) -> EventTable:
        self._compact()
        if not self.parts:
            return EventTable(
                [], np.zeros(1, np.int64), np.zeros(0), np.zeros((0, self.spec.width), np.int64)
            )
        u, t, c = self.parts[0]
        starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
        users = [self.names.get(int(code)) or canonical_str(int(code)) or "" for code in u[starts].tolist()]
        offsets = np.r_[starts, len(u)].astype(np.int64)
        return EventTable(users, offsets, t, c, source, self.read)
