"""Prepare a log for training: streaming passes over the log and a cache of encoded shards.

Memory is bounded by the vocabularies and the entity tables, never by the log:

1. **scan** -- split statistics (the distinct values of the split column, a histogram of the train
   rows' times for the validation tail) and, with ``drop_duplicates``, 128-bit row hashes spilled to
   disk partitions, each deduplicated alone (the first occurrence in file order is kept).
2. **fit** -- vocabularies (``min_count``, ``max_size``), numeric statistics and label statistics
   from the train rows (``model.features.SchemaFitter``), skipped for a given fitted schema
   (fine-tuning).
3. **encode** -- every used row encoded with the fitted schema into shards per split
   (``<cache>/<key>/<split>-f<fragment>-<k>.safetensors``: cats int32, nums, labels, groups,
   times, bias, and the ``[objective]``'s gain and list ids), plus the training rows per embedding
   row.

The cache key covers the data config, the tasks, the fitted schema given, and every log and
table file's size and mtime: later epochs, retrains and restarts stream from the same shards.

Splits keep their meaning: ``time`` takes split_column in train_range / test_range (or the last
train_days + test_days distinct values) and the validation tail is ``t > quantile(t_train, 1 -
valid_fraction)`` exactly as ``numpy.quantile`` computes it, found from a bounded histogram (and,
if the histogram had to be coarsened, one more pass over the time column); ``random`` hashes
(split_seed, fragment, row); ``column`` reads train / valid / test from split_column.

Under ``torchrun`` every rank reads only its own fragments (``Exchange`` says which and shares
the statistics): the passes' results are merged in fragment order, so the fitted schema is the
same bit for bit whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from model.config import Config, ConfigError, DataConfig, TaskConfig
from model.data.history import HistoryIndex, build_histories, check_columns
from model.data.source import DataError, EntityTable, Fragment, LogSource, file_fingerprint
from model.features import (
    ALL_GROUPS,
    BIAS,
    GROUPS,
    NULL_CODE,
    AnyGroup,
    CanonicalRows,
    FeatureSchema,
    FeatureSpec,
    Group,
    HashedColumn,
    Moments,
    SchemaFitter,
    SequenceSpec,
    StringMap,
    hash_column,
    numeric_column,
    schema_from_arrays,
    schema_to_arrays,
    stable_hash,
)
from model.files import replace_atomically
from model.objective import ObjectiveError, gain_columns, row_gain

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")
TRAIN, VALID, TEST, UNUSED = 0, 1, 2, -1
HIST_MAX = 1 << 21  # distinct time keys kept exactly before the histogram is coarsened
DEDUP_PARTITIONS = 64
# a scanned row: its 128-bit hash, position, and (time split) its split value's hash and time key
_DEDUP_DTYPE = np.dtype(
    [
        ("h1", "<u8"),
        ("h2", "<u8"),
        ("frag", "<i8"),
        ("row", "<i8"),
        ("split", "<i8"),
        ("tkey", "<i8"),
        ("tok", "?"),
    ]
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# ranks


class Exchange:
    """How the processes of a job share what each learned from its own fragments. One process:
    it owns every fragment and every collective is the identity."""

    rank: int = 0
    world: int = 1

    def all_gather(self, obj: T) -> list[T]:
        return [obj]

    def gather(self, obj: T, dst: int) -> list[T] | None:
        return [obj]

    def barrier(self) -> None:
        pass

    def owns(self, frag: Fragment) -> bool:
        return frag.index % self.world == self.rank


# --------------------------------------------------------------------------------------------
# schema of the config


def schema_from_config(cfg: DataConfig, bias_features: Sequence[str] = ()) -> FeatureSchema:
    """Unfitted schema of the declared features, plus ``bias_features`` (categorical log columns)."""
    specs = [
        FeatureSpec(
            name=f.name,
            group=f.group,
            kind=f.kind,
            min_count=f.min_count,
            max_size=f.max_size,
            log1p=f.log1p,
            hash_buckets=f.hash_buckets,
        )
        for f in cfg.features
    ]
    specs += [FeatureSpec(name=name, group=BIAS, kind="categorical") for name in bias_features]
    sequences = [
        SequenceSpec(
            name=q.name,
            labels=q.labels,
            max_len=q.max_len,
            pooling=q.pooling,
            items=[cfg.video_key or "", *q.side_features],
        )
        for q in cfg.sequences
    ]
    return FeatureSchema(
        specs, user_key=cfg.user_key or "", video_key=cfg.video_key or "", sequences=sequences
    )


def check_same_features(fitted: FeatureSchema, declared: FeatureSchema) -> None:
    """A fitted schema (e.g. a checkpoint's) can encode data declared by ``declared`` only if the
    serving features agree in name, group, kind, log1p and order."""

    def sig(s: FeatureSchema) -> list[tuple[str, str, str, bool]]:
        return [(f.name, f.group, f.kind, f.log1p) for f in s.serving().features]

    if sig(fitted) != sig(declared) or (fitted.user_key, fitted.video_key) != (
        declared.user_key,
        declared.video_key,
    ):
        raise DataError(
            "the config's features differ from the checkpoint's feature schema: "
            f"{sig(declared)} vs {sig(fitted)}"
        )
    if [q.to_dict() for q in fitted.sequences] != [q.to_dict() for q in declared.sequences]:
        raise DataError(
            "the config's data.sequences differ from the checkpoint's: "
            f"{[q.to_dict() for q in declared.sequences]} vs {[q.to_dict() for q in fitted.sequences]}"
        )


def derived_columns(d: DataConfig, columns: Sequence[str]) -> list[str]:
    """Columns the source adds to the log's: KuaiRand's ``hour`` (from ``hourmin``)."""
    return ["hour"] if d.source == "kuairand" and "hourmin" in columns else []


def add_derived(df: pd.DataFrame, derived: Sequence[str]) -> pd.DataFrame:
    """A log batch with the ``derived_columns`` added (``hour = hourmin // 100``)."""
    if "hour" in derived:
        df = df.assign(hour=(df["hourmin"] // 100).astype("int64"))
    return df


# --------------------------------------------------------------------------------------------
# labels and splits of a batch


def build_labels(df: pd.DataFrame, tasks: Sequence[TaskConfig]) -> np.ndarray:
    """Label matrix (N, T) float32; NaN where a label is not observed (masked in the loss)."""
    out = np.empty((len(df), len(tasks)), dtype=np.float32)
    for t, task in enumerate(tasks):
        if isinstance(task.label, dict):
            col = task.label["column"]
            if col not in df.columns:
                raise DataError(f"task {task.name!r}: label column {col!r} not in the log")
            want = task.label["equals"]
            codes = np.array([stable_hash(v) for v in (want if isinstance(want, list) else [want])])
            h = hash_column(df.loc[:, col]).codes
            y = np.where(h == NULL_CODE, np.nan, np.isin(h, codes)).astype(np.float64)
        else:
            cols = [task.label] if isinstance(task.label, str) else list(task.label)
            missing = [c for c in cols if c not in df.columns]
            if missing:
                raise DataError(f"task {task.name!r}: label columns {missing} not in the log")
            for c in cols:
                kind = df[c].dtype.kind
                if kind not in "biuf":
                    example = df[c].dropna().iloc[0] if df[c].notna().any() else None
                    raise DataError(
                        f"task {task.name!r}: label column {c!r} holds {df[c].dtype} values (e.g. "
                        f"{example!r}), not numbers; for a text label write "
                        f'label = {{ column = "{c}", equals = "<the positive value>" }}'
                    )
            if task.kind == "binary":
                vals = df[cols].to_numpy(dtype=np.float64)
                y = np.where(np.isnan(vals).all(axis=1), np.nan, (np.nan_to_num(vals) > 0).any(axis=1))
            else:
                if len(cols) != 1:
                    raise DataError(f"regression task {task.name!r} takes exactly one label column")
                y = df[cols[0]].to_numpy(dtype=np.float64)
                if task.transform == "log1p":
                    y = np.log1p(np.clip(y, 0.0, None))
        if task.mask_by is not None:
            if task.mask_by not in df.columns:
                raise DataError(f"task {task.name!r}: mask_by column {task.mask_by!r} not in the log")
            y = np.where(df[task.mask_by].to_numpy(dtype=np.float64, na_value=np.nan) > 0, y, np.nan)
        out[:, t] = y
    return out


def label_columns(tasks: Sequence[TaskConfig]) -> list[str]:
    cols: list[str] = []
    for t in tasks:
        if isinstance(t.label, dict):
            cols.append(t.label["column"])
        else:
            cols += [t.label] if isinstance(t.label, str) else list(t.label)
        if t.mask_by:
            cols.append(t.mask_by)
    return list(dict.fromkeys(cols))


def time_keys(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A time column as order-preserving int64 keys, and a mask of the rows that have a time."""
    a = values.to_numpy()
    if a.dtype.kind in "iub":
        return a.astype(np.int64), np.ones(len(a), dtype=bool)
    if a.dtype.kind == "M":
        return a.astype("datetime64[ns]").astype(np.int64), ~np.isnat(a)
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(x)
    bits = np.where(ok, x, 0.0).view(np.int64)
    return np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits), ok  # IEEE order as ints


def time_values(keys: np.ndarray, float_time: bool) -> np.ndarray:
    """Inverse of ``time_keys`` (int64 keys -> the column's values as float64)."""
    if not float_time:
        return keys.astype(np.float64)
    bits = np.where(keys < 0, keys ^ np.int64(0x7FFFFFFFFFFFFFFF), keys)
    return bits.view(np.float64)


def numpy_linear_quantile(lo: Any, hi: Any, n: int, q: float) -> float:
    """``np.quantile(a, q)`` (method "linear") of a sorted array of n values whose order statistics
    at floor((n - 1) q) and the next are ``lo`` and ``hi``: numpy's own interpolation formula."""
    virtual = (n - 1) * q
    gamma = virtual - math.floor(virtual)
    a, b = np.float64(lo), np.float64(hi)
    diff = b - a
    out = a + diff * gamma
    if gamma >= 0.5:
        out = b - diff * (1 - gamma)
    return float(out)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)).astype(np.uint64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)).astype(np.uint64)
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def random_uniform(seed: int, frag: int, rows: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per (seed, fragment, row): the random split, stable across runs."""
    with np.errstate(over="ignore"):
        base = _splitmix(np.array([seed * 1_000_003 + frag], dtype=np.uint64))[0]
        x = _splitmix(rows.astype(np.uint64) ^ base)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class SplitPlan:
    """What the scan learned: which rows are train / valid / test."""

    kind: str
    train_values: list[Any] = field(default_factory=list)  # time split: values of split_column
    test_values: list[Any] = field(default_factory=list)
    train_range: tuple[Any, Any] | None = None
    test_range: tuple[Any, Any] | None = None
    cut: float | None = None  # time split: valid = train & t > cut (None: no validation rows)

    def assign(self, df: pd.DataFrame, cfg: DataConfig, frag: int, row0: int) -> np.ndarray:
        """Split id per row (N,) int8: TRAIN, VALID, TEST or UNUSED."""
        n = len(df)
        out = np.full(n, UNUSED, dtype=np.int8)
        if self.kind == "random":
            u = random_uniform(cfg.split_seed, frag, np.arange(row0, row0 + n))
            out[:] = TRAIN
            out[u < cfg.test_fraction + cfg.valid_fraction] = VALID
            out[u < cfg.test_fraction] = TEST
            return out
        col = df[cfg.split_column]
        if self.kind == "column":
            h = hash_column(col).codes
            for sid, name in enumerate(SPLIT_NAMES):
                out[h == stable_hash(name)] = sid
            return out
        s = col.to_numpy()
        if self.train_range is not None and self.test_range is not None:
            train = (s >= self.train_range[0]) & (s <= self.train_range[1])
            test = (s >= self.test_range[0]) & (s <= self.test_range[1])
        else:
            train, test = col.isin(self.train_values).to_numpy(), col.isin(self.test_values).to_numpy()
        out[test] = TEST
        out[train] = TRAIN  # a row in both ranges is a train row, as before
        if self.cut is not None:
            t = pd.to_numeric(df[cfg.time_column], errors="coerce").to_numpy(dtype=np.float64)
            out[train & (t > self.cut)] = VALID
        return out


# --------------------------------------------------------------------------------------------
# pass 1: scan


class TimeHistogram:
    """Counts of time keys per split value, coarsened (keys >> shift) when it would exceed
    HIST_MAX entries, so its memory is bounded whatever the log's size."""

    def __init__(self, shift: int = 0) -> None:
        self.shift = shift
        self.parts: dict[Any, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, split_value: Any, keys: np.ndarray, sign: int = 1) -> None:
        k, c = np.unique(keys >> self.shift, return_counts=True)
        c = c * sign
        if split_value in self.parts:
            k0, c0 = self.parts[split_value]
            k, inv = np.unique(np.concatenate([k0, k]), return_inverse=True)
            c = np.bincount(inv, weights=np.concatenate([c0, c])).astype(np.int64)
        self.parts[split_value] = (k, c)
        while sum(len(v[0]) for v in self.parts.values()) > HIST_MAX:
            self.coarsen(self.shift + 4)

    def coarsen(self, shift: int) -> None:
        step = shift - self.shift
        for sv, (k, c) in list(self.parts.items()):
            k2, inv = np.unique(k >> step, return_inverse=True)
            self.parts[sv] = (k2, np.bincount(inv, weights=c).astype(np.int64))
        self.shift = shift

    def merge(self, other: TimeHistogram) -> None:
        if other.shift > self.shift:
            self.coarsen(other.shift)
        elif other.shift < self.shift:
            other.coarsen(self.shift)
        for sv, (k, c) in other.parts.items():
            if sv in self.parts:
                k0, c0 = self.parts[sv]
                k, inv = np.unique(np.concatenate([k0, k]), return_inverse=True)
                c = np.bincount(inv, weights=np.concatenate([c0, c])).astype(np.int64)
            self.parts[sv] = (k, c)


@dataclass
class ScanResult:
    # time split: the split column's values by their hash -> (value, rows); the train rows' times
    split_values: dict[int, tuple[Any, int]] = field(default_factory=dict)
    hist: TimeHistogram = field(default_factory=TimeHistogram)
    float_time: bool = False
    rows: dict[int, int] = field(default_factory=dict)  # rows read per fragment
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprints of files read


def _dedup_hashes(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Two 64-bit hashes of each row: pandas' row hash, and the same over the columns in reverse
    order with another key (another mixing of the per-column hashes), together 128 bits."""
    h1 = pd.util.hash_pandas_object(df, index=False).to_numpy(dtype=np.uint64)
    rev = df[df.columns[::-1]]
    h2 = pd.util.hash_pandas_object(rev, index=False, hash_key="mtrank-dedup-key").to_numpy(dtype=np.uint64)
    return h1, h2


# --------------------------------------------------------------------------------------------
# the prepared data


@dataclass(frozen=True)
class ShardInfo:
    split: str
    fragment: int
    file: str  # relative to the cache folder
    rows: int


@dataclass
class Prepared:
    """A prepared log: the fitted schema, statistics and the encoded shards (all fragments')."""

    root: Path
    schema: FeatureSchema
    fingerprint: dict[str, Any]
    label_stats: list[dict[str, float]]  # per task: n, mean, var of the observed train labels
    row_counts: np.ndarray  # (R,) train rows per embedding row (serving features' table layout)
    shards: list[ShardInfo]
    grouped: bool  # rows carry list groups (data.group_by): GAUC / NDCG are defined
    timed: bool  # rows carry the time column

    def split_shards(self, split: str, fragments: set[int] | None = None) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split and (fragments is None or s.fragment in fragments)]

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.shards if s.split == split)


def cache_key(cfg: Config, source: LogSource, tables: Sequence[Path], schema: FeatureSchema | None) -> str:
    data = dataclasses.asdict(cfg.data)
    for k in ("cache_dir", "data_dir", "read_batch_rows"):
        data.pop(k)
    if not data["sequences"]:
        data.pop("sequences")  # the keys of configs without histories stay what they were
    stat = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [*source.files, *tables]]
    blob = {
        "format": CACHE_FORMAT,
        "data": data,
        "tasks": [dataclasses.asdict(t) for t in cfg.tasks],
        "objective": dataclasses.asdict(cfg.objective),
        "bias": list(cfg.model.bias_features),
        "schema": schema.to_dict() if schema is not None else None,
        "files": stat,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_json(path: Path, obj: Any) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, default=str)))


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    replace_atomically(path, lambda tmp: save_file(contiguous, str(tmp)))


def load_prepared(root: Path) -> Prepared | None:
    """The cache folder's prepared data if it is complete (meta and every shard present)."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None
        schema = schema_from_arrays(meta["schema"], load_file(str(root / "vocab.safetensors")))
        row_counts = load_file(str(root / "row_counts.safetensors"))["row_counts"]
        shards = [ShardInfo(**s) for s in meta["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable data cache %s: %s", root, e)
        return None
    return Prepared(
        root,
        schema,
        meta["fingerprint"],
        meta["label_stats"],
        row_counts,
        shards,
        bool(meta["grouped"]),
        bool(meta["timed"]),
    )


# --------------------------------------------------------------------------------------------
# the passes


class Preparer:
    """Runs the passes for one process (its own fragments) and writes the cache."""

    def __init__(
        self,
        cfg: Config,
        root: Path,
        schema: FeatureSchema | None,
        exchange: Exchange,
        source: LogSource,
    ) -> None:
        self.cfg, self.d, self.root, self.given, self.ex, self.source = (
            cfg,
            cfg.data,
            root,
            schema,
            exchange,
            source,
        )
        self.declared = schema_from_config(cfg.data, cfg.model.bias_features)
        if not self.declared.serving().features:
            raise DataError("no features declared: add [[data.features]] entries to the config")
        if schema is not None:
            check_same_features(schema, self.declared)
        self.frags = [f for f in source.fragments if exchange.owns(f)]
        if self.d.max_rows is not None and exchange.world > 1:
            raise ConfigError("data.max_rows (the first N rows in file order) needs a single process")
        self.log_columns = source.columns()
        self.tables: dict[Group, EntityTable] = {}
        entities: tuple[tuple[Group, str | None, str | None], ...] = (
            ("user", self.d.users, self.d.user_key),
            ("video", self.d.videos, self.d.video_key),
        )
        for group, name, key in entities:
            if name is None:
                continue
            if key is None:
                raise ConfigError(f"data.{group}s names a table but data.{group}_key is empty")
            cats, nums = self.declared.columns(group)
            entity = EntityTable(self.d.path(name), key, cats, nums)
            clash = [c for c in entity.columns if c in self.log_columns]
            if clash:
                raise DataError(
                    f"{group} feature(s) {clash} are columns of the {name} table and also of the log"
                    f"{' or the users table' if group == 'video' else ''}: training would read the other"
                    " column while serving reads the table's; rename one of them"
                )
            if key not in self.log_columns:
                raise DataError(f"the log has no column {key!r} (data.{group}_key)")
            self.tables[group] = entity
        user_cols = set(self.tables["user"].columns) if "user" in self.tables else set()
        video_cols = set(self.tables["video"].columns) if "video" in self.tables else set()
        if group_clash := sorted(user_cols & video_cols):
            raise DataError(f"features {group_clash} are columns of both the users and the videos table")
        self.derived = derived_columns(self.d, self.log_columns)
        have = set(self.log_columns) | set(self.derived)
        for g in ALL_GROUPS:
            table_of = self.tables.get(g) if g != BIAS else None
            from_tables = set(table_of.columns) if table_of is not None else set()
            cats, nums = self.declared.columns(g)
            missing = [c for c in cats + nums if c not in have and c not in from_tables]
            if missing:
                what = "model.bias_features" if g == BIAS else f"{g} feature(s)"
                raise DataError(f"{what} {missing} are not columns of the log or of the {g}s table")
        if self.d.split in ("time", "column") and self.d.split_column not in self.log_columns:
            raise DataError(f"the log has no column {self.d.split_column!r} (data.split_column)")
        self.timed = self.d.time_column in self.log_columns
        if self.d.split == "time" and self.d.valid_fraction > 0 and not self.timed:
            raise DataError(f"the log has no column {self.d.time_column!r} (data.time_column)")
        missing_groups = [c for c in self.d.groups if c not in self.log_columns]
        if missing_groups:
            raise DataError(f"data.group_by columns {missing_groups} are not columns of the log")
        missing_labels = [c for c in label_columns(cfg.tasks) if c not in self.log_columns]
        if missing_labels:
            raise DataError(f"label / mask_by columns {missing_labels} are not columns of the log")
        missing_objective = [c for c in self.objective_columns() if c not in self.log_columns]
        if missing_objective:
            raise DataError(
                f"objective.gain / group_by columns {missing_objective} are not columns of the log"
            )
        if self.d.sequences:
            tables = [c for t in self.tables.values() for c in t.columns]
            check_columns(self.d, self.declared.sequences, self.log_columns, tables)
        self.histories: HistoryIndex | None = None
        self.drops: dict[int, np.ndarray] = {}
        self.dropped_records = np.zeros(0, _DEDUP_DTYPE)
        self.plan: SplitPlan | None = None
        self.read_rows: dict[int, int] = {}

    # -- reading -----------------------------------------------------------------------------
    def needed_columns(self) -> list[str]:
        cols = [
            c for g in ALL_GROUPS for part in self.declared.columns(g) for c in part if c in self.log_columns
        ]
        cols += [t.key for t in self.tables.values()] + label_columns(self.cfg.tasks) + self.d.groups
        cols += self.objective_columns()
        if self.d.split in ("time", "column"):
            cols.append(self.d.split_column)
        if self.timed:
            cols.append(self.d.time_column)
        if self.derived:
            cols.append("hourmin")
        return list(dict.fromkeys(c for c in cols if c in self.log_columns))

    def batches(
        self, columns: Sequence[str] | None, frags: Sequence[Fragment] | None = None
    ) -> Iterator[tuple[Fragment, int, pd.DataFrame]]:
        """(fragment, first row, frame) over this process's fragments (or ``frags``), honouring
        max_rows."""
        left = self.d.max_rows
        for frag in self.frags if frags is None else frags:
            row0 = 0
            for df in self.source.batches(frag, columns):
                if left is not None:
                    if left <= 0:
                        return
                    df = df.iloc[:left]
                    left -= len(df)
                yield frag, row0, df.reset_index(drop=True)
                row0 += len(df)

    def kept(self, frag: Fragment, row0: int, n: int) -> np.ndarray:
        """Rows of a batch that are not dropped duplicates."""
        drops = self.drops.get(frag.index)
        keep = np.ones(n, dtype=bool)
        if drops is not None and len(drops):
            lo, hi = np.searchsorted(drops, [row0, row0 + n])
            keep[drops[lo:hi] - row0] = False
        return keep

    def derive(self, df: pd.DataFrame) -> pd.DataFrame:
        return add_derived(df, self.derived)

    # -- pass 1 ------------------------------------------------------------------------------
    def scan(self, tmp: Path) -> ScanResult:
        res = ScanResult()
        dedup = self.d.dedup
        cols: list[str] | None
        if dedup:
            cols = None  # every column: duplicates are rows identical in all of them
        else:
            # (a day column may be the time column too: each column once)
            cols = list(
                dict.fromkeys(c for c in (self.d.split_column, self.d.time_column) if c in self.log_columns)
            )
            cols = cols or self.log_columns[:1]
        spill: dict[int, Any] = {}
        try:
            for frag, row0, df in self.batches(cols):
                n = len(df)
                res.rows[frag.index] = res.rows.get(frag.index, 0) + n
                split_codes, tkeys, tok = (
                    self._scan_split(df, res) if self.d.split == "time" else (0, 0, False)
                )
                if dedup:
                    h1, h2 = _dedup_hashes(df)
                    rec = np.empty(n, dtype=_DEDUP_DTYPE)
                    rec["h1"], rec["h2"], rec["frag"], rec["row"] = (
                        h1,
                        h2,
                        frag.index,
                        np.arange(row0, row0 + n),
                    )
                    rec["split"], rec["tkey"], rec["tok"] = split_codes, tkeys, tok
                    part = (h1 >> np.uint64(58)).astype(np.int64)  # 64 partitions by the top bits
                    for p in np.unique(part):
                        if p not in spill:
                            spill[p] = (tmp / f"dedup-{p:02d}.bin").open("ab")
                        spill[p].write(rec[part == p].tobytes())
        finally:
            for f in spill.values():
                f.close()
        for path in sorted({f.path for f in self.frags if f.row_group in (None, 0)}):
            res.files[str(path)] = file_fingerprint(path)
        return res

    def _scan_split(self, df: pd.DataFrame, res: ScanResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts the split column's values and histograms the times per value; returns each
        row's (split value hash, time key, has a time)."""
        col = df[self.d.split_column]
        h = hash_column(col)
        codes = h.codes
        values = {int(c): v for c, v in zip(h.uniq_codes, pd.unique(col.dropna()), strict=False)}
        uniq, inv, cnt = np.unique(codes, return_inverse=True, return_counts=True)
        first = np.zeros(len(uniq), dtype=np.int64)
        first[inv[::-1]] = np.arange(len(codes))[::-1]  # a row holding each value
        for u, c, i in zip(uniq.tolist(), cnt.tolist(), first.tolist(), strict=True):
            if u == NULL_CODE:
                continue
            v = col.iloc[i]
            v = v.item() if hasattr(v, "item") else v
            old = res.split_values.get(u, (v, 0))
            res.split_values[u] = (old[0], old[1] + c)
        del values
        if len(res.split_values) > 1_000_000:
            raise DataError(
                f"data.split_column {self.d.split_column!r} has over a million distinct values: "
                'a time split needs a day-like column (or use split = "random")'
            )
        if self.d.valid_fraction > 0 and self.timed:
            keys, ok = time_keys(df[self.d.time_column])
            res.float_time = res.float_time or df[self.d.time_column].dtype.kind == "f"
            for u in uniq.tolist():
                m = ok & (codes == u)
                if u != NULL_CODE and m.any():
                    res.hist.add(u, keys[m])
            return codes, keys, ok
        return codes, np.zeros(len(df), np.int64), np.zeros(len(df), bool)

    def dedup(self, tmp: Path) -> dict[int, np.ndarray]:
        """Partition by partition: the rows to drop (all but the first of each duplicate set)."""
        dropped: list[np.ndarray] = []
        for p in range(DEDUP_PARTITIONS):
            path = tmp / f"dedup-{p:02d}.bin"
            mine = np.fromfile(path, dtype=_DEDUP_DTYPE) if path.exists() else np.zeros(0, _DEDUP_DTYPE)
            parts = self.ex.gather(mine, dst=p % self.ex.world)
            if parts is None:
                continue
            rec = np.concatenate(parts)
            rec = rec[np.lexsort((rec["row"], rec["frag"], rec["h2"], rec["h1"]))]
            dup = np.zeros(len(rec), dtype=bool)
            if len(rec) > 1:
                dup[1:] = (rec["h1"][1:] == rec["h1"][:-1]) & (rec["h2"][1:] == rec["h2"][:-1])
            dropped.append(rec[dup])
        mine_all = np.concatenate(dropped) if dropped else np.zeros(0, _DEDUP_DTYPE)
        every = np.concatenate(self.ex.all_gather(mine_all))
        self.dropped_records = every
        out: dict[int, np.ndarray] = {}
        for f in np.unique(every["frag"]):
            out[int(f)] = np.sort(every["row"][every["frag"] == f])
        return out

    def plan_split(self, scans: list[ScanResult]) -> SplitPlan:
        d = self.d
        if d.split != "time":
            return SplitPlan(d.split)
        by_code: dict[int, list[Any]] = {}
        for s in scans:
            for code, (v, c) in s.split_values.items():
                by_code.setdefault(code, [v, 0])[1] += c
        dups = self.dropped_records
        hist = TimeHistogram()
        for s in scans:
            hist.merge(s.hist)
        for code in np.unique(dups["split"]) if len(dups) else []:  # duplicates do not count
            m = dups["split"] == code
            if int(code) in by_code:
                by_code[int(code)][1] -= int(m.sum())
            m &= dups["tok"]
            if m.any():
                hist.add(int(code), dups["tkey"][m], sign=-1)
        values = {v: c for v, c in by_code.values() if c > 0}
        code_of = {v: code for code, (v, c) in by_code.items() if c > 0}
        if d.train_days is not None and d.test_days is not None:
            try:
                distinct = sorted(values)
            except TypeError as e:
                raise DataError(f"data.split_column {d.split_column!r} mixes types: {e}") from None
            if len(distinct) < d.test_days + 1:
                raise DataError(
                    f"data.split_column {d.split_column!r} has {len(distinct)} distinct values: too few "
                    f"for test_days = {d.test_days} and a train split"
                )
            test = distinct[-d.test_days :]
            train = distinct[-d.test_days - d.train_days : -d.test_days]
            plan = SplitPlan("time", train_values=train, test_values=test)
            in_train = set(train)
        else:
            assert d.train_range is not None and d.test_range is not None
            plan = SplitPlan("time", train_range=d.train_range, test_range=d.test_range)
            try:
                in_train = {v for v in values if d.train_range[0] <= v <= d.train_range[1]}
            except TypeError:
                raise DataError(
                    f"data.train_range {list(d.train_range)} cannot be compared with the values of "
                    f"{d.split_column!r} (e.g. {next(iter(values))!r})"
                ) from None
        if d.valid_fraction > 0 and self.timed:
            float_time = any(s.float_time for s in scans)
            plan.cut = self._valid_cut(hist, {code_of[v] for v in in_train}, float_time)
        return plan

    def _valid_cut(self, hist: TimeHistogram, in_train: set[Any], float_time: bool) -> float | None:
        """np.quantile(t_train, 1 - valid_fraction), from the histogram (exact when it was never
        coarsened; else the two order statistics are read back in one more pass)."""
        parts = [hist.parts[v] for v in in_train if v in hist.parts]
        if not parts:
            return None
        keys, inv = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
        counts = np.bincount(inv, weights=np.concatenate([p[1] for p in parts])).astype(np.int64)
        n = int(counts.sum())
        q = 1.0 - self.d.valid_fraction
        virtual = (n - 1) * q
        lo_rank = math.floor(virtual)
        hi_rank = min(lo_rank + 1, n - 1)
        cum = np.cumsum(counts)
        lo_key, hi_key = keys[np.searchsorted(cum, lo_rank + 1)], keys[np.searchsorted(cum, hi_rank + 1)]
        if hist.shift == 0:
            lo, hi = time_values(np.array([lo_key, hi_key]), float_time)
            return numpy_linear_quantile(lo, hi, n, q)
        # coarsened: the exact times inside the buckets of the two order statistics
        below = int(cum[np.searchsorted(keys, lo_key)] - counts[np.searchsorted(keys, lo_key)])
        exact = np.sort(
            np.concatenate(self.ex.all_gather(self._bucket_times(hist.shift, in_train, lo_key, hi_key)))
        )
        lo_v, hi_v = exact[lo_rank - below], exact[hi_rank - below]
        lo, hi = time_values(np.array([lo_v, hi_v]), float_time)
        return numpy_linear_quantile(lo, hi, n, q)

    def _bucket_times(self, shift: int, in_train: set[Any], *buckets: int) -> np.ndarray:
        out = []
        cols = list(dict.fromkeys([self.d.split_column, self.d.time_column]))
        for frag, row0, df in self.batches(cols):
            keys, ok = time_keys(df[self.d.time_column])
            in_split = np.isin(
                hash_column(df[self.d.split_column]).codes, np.array(sorted(in_train), dtype=np.int64)
            )
            m = ok & in_split & self.kept(frag, row0, len(df))
            m &= np.isin(keys >> shift, np.array(buckets, dtype=np.int64))
            out.append(keys[m])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    # -- per-batch feature columns -------------------------------------------------------------
    def canonical(self, g: AnyGroup, df: pd.DataFrame, schema: FeatureSchema) -> CanonicalRows:
        """A group's canonical rows for a log batch (entity features joined from their table)."""
        cats, nums = self.group_columns(g, df, schema)
        codes = np.stack([c for c, _ in cats], axis=1) if cats else np.zeros((len(df), 0), np.int64)
        return CanonicalRows(codes, nums)

    def group_columns(
        self, g: AnyGroup, df: pd.DataFrame, schema: FeatureSchema, names: bool = False
    ) -> tuple[list[tuple[np.ndarray, StringMap | None]], np.ndarray]:
        """A group's categorical columns as (codes, their strings if ``names``) and numerics (N, F)."""
        table = self.tables.get(g) if g != BIAS else None
        rows = table.locate(hash_column(df[table.key]).codes) if table is not None else None
        cats: list[tuple[np.ndarray, StringMap | None]] = []
        for spec in schema.cats(g):
            if table is not None and spec.name in table.cats:
                assert rows is not None
                cats.append((table.cat_codes(spec.name, rows), table.names[spec.name]))
            else:
                h: HashedColumn = hash_column(df[spec.name])
                cats.append((h.codes, StringMap.of(h) if names else None))
        nums = np.empty((len(df), len(schema.nums(g))), dtype=np.float32)
        for j, spec in enumerate(schema.nums(g)):
            if table is not None and spec.name in table.nums:
                assert rows is not None
                nums[:, j] = table.num_values(spec.name, rows)
            else:
                nums[:, j] = numeric_column(df[spec.name], spec.name, "the log")
        return cats, nums

    # -- pass 2 ------------------------------------------------------------------------------
    def fit(
        self,
    ) -> tuple[SchemaFitter, dict[int, dict[tuple[AnyGroup, str], Moments]], dict[int, list[Moments]]]:
        """The train rows' value counts (one counter per feature: counts add up in any order), and
        per fragment the numeric features' and the labels' moments (merged in fragment order later,
        so the statistics do not depend on which rank read which fragment)."""
        assert self.plan is not None
        counts = SchemaFitter(self.declared)
        moments: dict[int, dict[tuple[AnyGroup, str], Moments]] = {}
        labels: dict[int, list[Moments]] = {}
        cols = self.needed_columns()
        for frag, row0, df in self.batches(cols):
            df = self.derive(df)
            sid = self.plan.assign(df, self.d, frag.index, row0)
            m = (sid == TRAIN) & self.kept(frag, row0, len(df))
            if not m.any():
                continue
            df = df.loc[m].reset_index(drop=True)
            fm = moments.setdefault(frag.index, {})
            for g in ALL_GROUPS:
                if not self.declared.cats(g) and not self.declared.nums(g):
                    continue
                cats, nums = self.group_columns(g, df, self.declared, names=True)
                for spec, (codes, names) in zip(self.declared.cats(g), cats, strict=True):
                    if spec.hash_buckets is None:  # a hashed feature has no vocabulary to count
                        assert names is not None
                        counts.update_counts(g, spec.name, codes, names)
                for j, spec in enumerate(self.declared.nums(g)):
                    x = nums[:, j].astype(np.float64)
                    if spec.log1p:
                        x = np.log1p(np.clip(x, 0.0, None))
                    fm.setdefault((g, spec.name), Moments()).add(x)
            y = build_labels(df, self.cfg.tasks).astype(np.float64)
            lm = labels.setdefault(frag.index, [Moments() for _ in self.cfg.tasks])
            for t in range(y.shape[1]):
                lm[t].add(y[:, t])
        return counts, moments, labels

    # -- pass 3 ------------------------------------------------------------------------------
    def encode(self, schema: FeatureSchema) -> tuple[list[ShardInfo], np.ndarray, dict[str, int]]:
        assert self.plan is not None
        offsets = np.cumsum([0] + [f.cardinality for f in schema.cats()])
        row_counts = np.zeros(int(offsets[-1]), dtype=np.int64)
        shards: list[ShardInfo] = []
        counts: dict[str, int] = defaultdict(int)
        cols = self.needed_columns()
        buffers: dict[tuple[int, int], list[dict[str, np.ndarray]]] = defaultdict(list)
        written: dict[tuple[int, int], int] = defaultdict(int)

        def flush(frag: int, sid: int, final: bool) -> None:
            parts = buffers[(frag, sid)]
            n = sum(len(p["labels"]) for p in parts)
            while n >= self.d.shard_rows or (final and n > 0):
                cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                take = min(n, self.d.shard_rows)
                name = f"{SPLIT_NAMES[sid]}-f{frag:05d}-{written[(frag, sid)]:04d}.safetensors"
                _save_arrays(self.root / name, {k: v[:take] for k, v in cat.items()})
                shards.append(ShardInfo(SPLIT_NAMES[sid], frag, name, take))
                written[(frag, sid)] += 1
                parts = [{k: v[take:] for k, v in cat.items()}] if n > take else []
                n -= take
            buffers[(frag, sid)] = parts

        current: int | None = None
        for frag, row0, df in self.batches(cols):
            if current is not None and frag.index != current:
                for sid in range(3):
                    flush(current, sid, final=True)
            current = frag.index
            df = self.derive(df)
            sid_all = self.plan.assign(df, self.d, frag.index, row0)
            keep = self.kept(frag, row0, len(df))
            counts["log_rows"] += len(df)
            counts["duplicates_dropped"] += int((~keep).sum())
            counts["rows_unused"] += int(((sid_all == UNUSED) & keep).sum())
            labels = build_labels(df, self.cfg.tasks)
            cats_parts, nums_parts = [], []
            for g in GROUPS:
                enc_c, enc_n = schema.encode(g, self.canonical(g, df, schema))
                cats_parts.append(enc_c)
                nums_parts.append(enc_n)
            cats = np.concatenate(cats_parts, axis=1)
            nums = np.concatenate(nums_parts, axis=1)
            bias = schema.encode(BIAS, self.canonical(BIAS, df, schema))[0] if schema.bias else None
            groups = self.group_ids(df)
            gain, lists = self.objective_arrays(df, labels)
            hist = self.histories.arrays(frag.index, row0, len(df)) if self.histories is not None else {}
            times = (
                pd.to_numeric(df[self.d.time_column], errors="coerce").to_numpy(dtype=np.float64)
                if self.timed
                else None
            )
            for sid in range(3):
                m = (sid_all == sid) & keep
                if not m.any():
                    continue
                counts[f"{SPLIT_NAMES[sid]}_rows"] += int(m.sum())
                part = {
                    "cats": cats[m].astype(np.int32),
                    "nums": nums[m],
                    "labels": labels[m],
                    "groups": groups[m],
                    "gain": gain[m],
                    "lists": lists[m],
                }
                if bias is not None:
                    part["bias"] = bias[m].astype(np.int32)
                if times is not None:
                    part["times"] = times[m]
                for k, v in hist.items():
                    part[k] = v[m]
                if sid == TRAIN and cats.shape[1]:
                    row_counts += np.bincount((cats[m] + offsets[:-1]).ravel(), minlength=len(row_counts))
                buffers[(frag.index, sid)].append(part)
                flush(frag.index, sid, final=False)
        if current is not None:
            for sid in range(3):
                flush(current, sid, final=True)
        return shards, row_counts, dict(counts)

    def objective_columns(self) -> list[str]:
        return gain_columns(self.cfg.objective) + self.cfg.objective.lists(self.d)

    def objective_arrays(self, df: pd.DataFrame, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the objective's gain (float64) and list id (``model.objective``)."""
        try:
            gain = row_gain(df, self.cfg, labels)
        except ObjectiveError as e:
            raise DataError(str(e)) from None
        return gain, self.group_ids(df, self.cfg.objective.lists(self.d))

    def group_ids(self, df: pd.DataFrame, columns: Sequence[str] | None = None) -> np.ndarray:
        cols = self.d.groups if columns is None else list(columns)
        if not cols:
            return np.zeros(len(df), dtype=np.int64)
        out = hash_column(df[cols[0]]).codes.astype(np.uint64)
        with np.errstate(over="ignore"):
            for c in cols[1:]:
                out = _splitmix(out ^ hash_column(df[c]).codes.astype(np.uint64))
        return out.view(np.int64)


def prepare(
    cfg: Config,
    cache_dir: str | Path,
    *,
    schema: FeatureSchema | None = None,
    exchange: Exchange | None = None,
) -> Prepared:
    """Prepare (or reuse from ``cache_dir``) the encoded shards of a config's data.

    ``schema``: a fitted schema to encode with (fine-tuning: the source checkpoint's); its bias
    features are refitted when they are not the configured ones.
    """
    ex = exchange or Exchange()
    source = LogSource(cfg.data, cfg.data.read_batch_rows)
    table_paths = [cfg.data.path(n) for n in (cfg.data.users, cfg.data.videos) if n is not None]
    root = Path(cache_dir) / cache_key(cfg, source, table_paths, schema)
    cached = load_prepared(root)
    if cached is not None and all(
        (root / s.file).is_file() for s in cached.shards if ex.owns(source.fragments[s.fragment])
    ):
        log.info("data: reusing the encoded shards in %s", root)
        return cached
    if ex.world > 1 and len(source.fragments) < ex.world:
        log.warning(
            "the log has %d fragment(s) (Parquet row groups / CSV files) for %d ranks: ranks without one "
            "only pad every step; write the log as at least %d Parquet files or row groups",
            len(source.fragments),
            ex.world,
            ex.world,
        )
    root.mkdir(parents=True, exist_ok=True)
    prep = Preparer(cfg, root, schema, ex, source)
    tmp = Path(tempfile.mkdtemp(prefix=f".scan-r{ex.rank}-", dir=root))
    try:
        scan = prep.scan(tmp)
        scans = ex.all_gather(scan)
        prep.drops = prep.dedup(tmp) if cfg.data.dedup else {}
        prep.plan = prep.plan_split(scans)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    value_counts, moments, label_moments = prep.fit()
    fitter = SchemaFitter(prep.declared)
    all_moments: dict[int, dict[tuple[AnyGroup, str], Moments]] = {}
    all_labels: dict[int, list[Moments]] = {}
    for c, fm, lm in ex.all_gather((value_counts, moments, label_moments)):
        for key, counter in c.counters.items():
            fitter.counters[key].merge(counter)
        all_moments.update(fm)
        all_labels.update(lm)
    for k in sorted(all_moments):  # fragment order: the same statistics whoever read the fragment
        for key, m in all_moments[k].items():
            fitter.moments[key].merge(m)
    fitted = fitter.result()
    if schema is not None:
        bias = fitted.bias if [f.name for f in schema.bias] != list(cfg.model.bias_features) else schema.bias
        fitted = FeatureSchema(
            schema.serving().features + bias,
            user_key=schema.user_key,
            video_key=schema.video_key,
            sequences=list(schema.sequences),
        )
    stats = [Moments() for _ in cfg.tasks]
    for k in sorted(all_labels):
        for t, m in enumerate(all_labels[k]):
            stats[t].merge(m)
    for t, task in enumerate(cfg.tasks):
        if stats[t].n == 0:
            raise DataError(f"task {task.name!r} has no observed label in the train split")
    hist_tmp = Path(tempfile.mkdtemp(prefix=f".hist-r{ex.rank}-", dir=root)) if fitted.sequences else None
    try:
        if hist_tmp is not None:  # every row's history, before the rows are encoded
            prep.histories = build_histories(prep, fitted, hist_tmp, scan.rows)
        shards, row_counts, counts = prep.encode(fitted)
    finally:
        prep.histories = None
        if hist_tmp is not None:
            shutil.rmtree(hist_tmp, ignore_errors=True)
    gathered = ex.all_gather((shards, row_counts, counts, scan.files, sorted(source.read_fragments)))
    all_shards = sorted((s for g in gathered for s in g[0]), key=lambda s: (s.split, s.fragment, s.file))
    total_counts: dict[str, int] = defaultdict(int)
    files: dict[str, dict[str, Any]] = {}
    for _, _, part_counts, fps, _ in gathered:
        for name, v in part_counts.items():
            total_counts[name] += v
        files.update(fps)
    row_counts = np.sum([g[1] for g in gathered], axis=0)
    fingerprint = _fingerprint(cfg.data, source, files, dict(total_counts), prep)
    fingerprint["fragments"] = len(source.fragments)
    if ex.world > 1:  # which log fragments each rank read (each reads only its own)
        fingerprint["fragments_read"] = {str(r): g[4] for r, g in enumerate(gathered)}
    _check_splits(cfg.data, fingerprint)
    prepared = Prepared(
        root,
        fitted,
        fingerprint,
        [{"n": m.n, "mean": m.mean, "var": m.m2 / m.n if m.n else 0.0} for m in stats],
        row_counts,
        all_shards,
        bool(cfg.data.groups),
        prep.timed,
    )
    _write_meta(prepared)
    ex.barrier()
    log.info(
        "data: %d log rows, %d duplicates dropped, train=%d valid=%d test=%d rows, %d unused (%s)",
        fingerprint["log_rows"],
        fingerprint["duplicates_dropped"],
        fingerprint["train_rows"],
        fingerprint["valid_rows"],
        fingerprint["test_rows"],
        fingerprint["rows_unused"],
        root,
    )
    return prepared


def _fingerprint(
    d: DataConfig, source: LogSource, files: dict[str, dict[str, Any]], counts: dict[str, int], prep: Preparer
) -> dict[str, Any]:
    fp: dict[str, Any] = {}
    logs = [files[str(p)] for p in source.files if str(p) in files]
    if len(source.files) == 1 and logs:
        fp["log"] = logs[0]
    else:
        digest = hashlib.sha256("".join(f["sha256"] for f in logs).encode()).hexdigest()
        fp["log"] = {
            "path": str(d.path(d.log)),
            "files": len(source.files),
            "bytes": sum(f["bytes"] for f in logs),
            "sha256": digest,
        }
    for group, table in prep.tables.items():
        fp[group + "s"] = file_fingerprint(table.path)
    for k in ("log_rows", "duplicates_dropped", "rows_unused", "train_rows", "valid_rows", "test_rows"):
        fp[k] = int(counts.get(k, 0))
    fp["split"] = d.split
    return fp


def _check_splits(d: DataConfig, fp: Mapping[str, Any]) -> None:
    """An empty split is an error that names the fix (never a silent fallback)."""
    if fp["duplicates_dropped"]:
        share = fp["duplicates_dropped"] / max(fp["log_rows"], 1)
        (log.warning if share > 0.05 else log.info)(
            "data: dropped %d duplicate rows (%.1f%% of the log; data.drop_duplicates = false keeps them)",
            fp["duplicates_dropped"],
            100 * share,
        )
    how = {
        "time": f"data.train_range / test_range (or train_days / test_days) against {d.split_column!r}",
        "random": "data.test_fraction / valid_fraction",
        "column": f'the values of {d.split_column!r} (want "train", "valid", "test")',
    }[d.split]
    for name in ("train", "test"):
        if fp[f"{name}_rows"] == 0:
            raise DataError(f"the {name} split is empty: check {how}")
    if fp["valid_rows"] == 0 and (d.valid_fraction > 0 or d.split == "column"):
        hint = (
            f'the train rows\' {d.time_column!r} values are all tied or too few (use split = "random", or'
            " valid_fraction = 0 to train without validation)"
            if d.split == "time"
            else how
        )
        raise DataError(f"the validation split is empty: {hint}")


def _write_meta(p: Prepared) -> None:
    meta, arrays = schema_to_arrays(p.schema)
    _save_arrays(p.root / "vocab.safetensors", arrays or {"_": np.zeros(0, np.int64)})
    _save_arrays(p.root / "row_counts.safetensors", {"row_counts": p.row_counts})
    _write_json(
        p.root / "meta.json",
        {
            "format": CACHE_FORMAT,
            "schema": meta,
            "fingerprint": p.fingerprint,
            "label_stats": p.label_stats,
            "shards": [dataclasses.asdict(s) for s in p.shards],
            "grouped": p.grouped,
            "timed": p.timed,
        },
    )
