"""Feature schema: typed features, their canonical form, vocabularies and normalisation.

A feature belongs to one *group*: ``user`` and ``video`` features come from entity tables (the
online feature store serves them), ``context`` features come with the request (tab, hour, ...).
The ``bias`` group holds logged selection-bias features (display position, device) that only the
training-time bias tower reads: they are never part of the serving input (``GROUPS``, ``cats()``,
``nums()`` and so ``Ranker`` leave them out). A bias feature may share its log column, and so its
name, with a serving feature (``device`` is both context and a position-bias interaction).

Three representations, one code path for training and serving (no train/serve skew):

1. raw values      -- whatever the tables or a request hold ("full_active", 3, 17.5, None)
2. canonical rows  -- model-version independent: categoricals as a stable signed 64-bit hash of the
                      value's string form, numerics as float32 (NaN = missing). This is what the
                      feature stores keep, so a retrained model with new vocabularies needs no
                      re-materialisation.
3. encoded rows    -- model-version specific: categorical -> embedding index (0 = unknown / rare),
                      numeric -> optional log1p, then standardised with train-only statistics.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

Group = Literal["user", "video", "context"]
BiasGroup = Literal["bias"]
AnyGroup = Group | BiasGroup
Kind = Literal["categorical", "numeric"]
GROUPS: tuple[Group, ...] = ("user", "video", "context")  # the serving input, in model column order
BIAS: BiasGroup = "bias"
ALL_GROUPS: tuple[AnyGroup, ...] = (*GROUPS, BIAS)
NULL_CODE = 0  # canonical code of a missing categorical value


class FeatureError(ValueError):
    """Raised for features that do not fit the schema (unknown column, wrong type, bad config)."""


# --------------------------------------------------------------------------------------------
# canonical form


def canonical_str(value: Any) -> str | None:
    """The string a categorical value is hashed from; None for missing. 3, 3.0 and "3" agree."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        # the shortest decimal at the value's own precision, so a float32 column's 0.1 (stored as
        # 0.100000001490116...) and a request's JSON 0.1 agree
        return repr(float(str(value))) if isinstance(value, np.floating) else repr(float(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    s = str(value)
    return s if s != "" else None


def stable_hash(value: Any) -> int:
    """Signed 64-bit hash of a categorical value, identical across processes and machines."""
    return _hash_str(canonical_str(value))


def _hash_str(s: str | None) -> int:
    if s is None:
        return NULL_CODE
    h = int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
    return h if h != NULL_CODE else 1


def object_values(col: pd.Series) -> np.ndarray:
    """A column as an object array of its values; floats keep their own precision (a float32 column
    gives np.float32 scalars, so ``canonical_str`` prints the float32 value's shortest decimal)."""
    a = col.to_numpy()
    if a.dtype.kind != "f":
        return col.to_numpy(dtype=object)
    out = np.empty(len(a), dtype=object)
    out[:] = list(a)
    return out


def hash_series(values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
    """Vectorised stable_hash: hashes each distinct value once. Returns int64 (N,)."""
    codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
    table = np.array([stable_hash(u) for u in uniques] + [NULL_CODE], dtype=np.int64)
    return table[codes]  # the -1 sentinel picks the trailing NULL_CODE


@dataclass
class HashedColumn:
    """A column's canonical hashes (N,) int64, and each distinct hash with its canonical string."""

    codes: np.ndarray
    uniq_codes: np.ndarray  # (U,) int64, distinct, no NULL_CODE
    uniq_strings: list[str]  # (U,) canonical_str of each


def hash_column(col: pd.Series) -> HashedColumn:
    """``hash_series`` of a table column without boxing it: factorised in its own dtype (a float32
    column's values stay float32, so ``canonical_str`` prints their float32 shortest decimal), each
    distinct value hashed once."""
    values = col.to_numpy() if col.dtype.kind in "biuf" else col
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    strings = [canonical_str(u) for u in uniques]
    table = np.empty(len(strings) + 1, dtype=np.int64)
    for i, s in enumerate(strings):
        table[i] = _hash_str(s)
    table[-1] = NULL_CODE
    out = table[codes]  # the -1 sentinel picks the trailing NULL_CODE
    keep = [i for i, s in enumerate(strings) if s is not None]
    first: dict[int, int] = {}  # 3 and 3.0 are one category: keep one entry per hash
    for i in keep:
        first.setdefault(int(table[i]), i)
    idx = list(first.values())
    return HashedColumn(out, table[idx], [strings[i] for i in idx])  # type: ignore[misc]


def to_float(values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
    """Numeric canonical form: float32, NaN for missing or unparsable values."""
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)


def numeric_column(col: pd.Series, name: str, where: str, row0: int = 0) -> np.ndarray:
    """A numeric feature's column as float32 (NaN for missing values); a value that is present but
    not a number is a FeatureError naming the column, the value and its row (``row0`` + position,
    1-based), as ``/rank`` refuses one, instead of a silently missing value."""
    x = to_float(col)
    if col.dtype.kind not in "biuf":  # numeric dtypes hold numbers or NaN only
        bad = np.flatnonzero(np.isnan(x) & col.notna().to_numpy())
        if len(bad):
            i = int(bad[0])
            raise FeatureError(
                f"numeric feature {name!r} holds {_short(col.iloc[i])} in row {row0 + i + 1} of {where} "
                f"({len(bad)} such value(s) in that batch): not a number; declare the feature "
                '`kind = "categorical"`, or clean the column'
            )
    return x


@dataclass
class CanonicalRows:
    """Canonical rows of one group: ``cats`` (N, C) int64 hashes, ``nums`` (N, F) float32."""

    cats: np.ndarray
    nums: np.ndarray

    def __len__(self) -> int:
        return int(self.cats.shape[0])

    def take(self, idx: np.ndarray) -> CanonicalRows:
        return CanonicalRows(self.cats[idx], self.nums[idx])


# --------------------------------------------------------------------------------------------
# schema


@dataclass
class FeatureSpec:
    name: str
    group: AnyGroup
    kind: Kind
    # categorical: raw values (canonical strings) in index order; index 0 is reserved for unknown
    vocab: list[str] | None = None
    min_count: int = 1
    max_size: int | None = None
    # numeric: optional log1p (heavy-tailed counts), then (x - mean) / std
    log1p: bool = False
    mean: float = 0.0
    std: float = 1.0
    # categorical without a vocabulary: value -> 1 + hash mod hash_buckets (unbounded id spaces)
    hash_buckets: int | None = None

    def __post_init__(self) -> None:
        if self.group not in ALL_GROUPS:
            raise FeatureError(
                f"feature {self.name!r}: group must be one of {ALL_GROUPS}, got {self.group!r}"
            )
        if self.group == BIAS and self.kind != "categorical":
            raise FeatureError(f"bias feature {self.name!r} must be categorical")
        if self.kind not in ("categorical", "numeric"):
            raise FeatureError(f"feature {self.name!r}: kind must be categorical or numeric")
        if self.hash_buckets is not None:
            if self.kind != "categorical" or self.hash_buckets < 1:
                raise FeatureError(
                    f"feature {self.name!r}: hash_buckets needs a categorical feature and >= 1"
                )
            if self.vocab:
                raise FeatureError(f"feature {self.name!r}: a hashed feature has no vocabulary")

    @property
    def cardinality(self) -> int:
        """Embedding rows: vocabulary size (or hash buckets) plus the unknown row 0."""
        if self.hash_buckets is not None:
            return self.hash_buckets + 1
        return len(self.vocab or []) + 1

    def set_vocab_codes(self, codes: np.ndarray) -> None:
        """The vocabulary's hashes in index order, when already known (fitting computes them), so
        look-ups need not hash every vocabulary string again."""
        if len(codes) != len(self.vocab or []):
            raise FeatureError(
                f"feature {self.name!r}: {len(codes)} codes for {len(self.vocab or [])} values"
            )
        self.__dict__["_codes"] = np.asarray(codes, dtype=np.int64)
        self.__dict__.pop("_lookup", None)

    def vocab_codes(self) -> np.ndarray:
        """The vocabulary's canonical hashes in index order (index i + 1 holds vocab[i])."""
        codes = self.__dict__.get("_codes")
        if codes is None:
            codes = np.array([stable_hash(v) for v in self.vocab or []], dtype=np.int64)
            self.__dict__["_codes"] = codes
        return codes

    @cached_property
    def _lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted hashes, embedding index for each) for vectorised vocabulary look-ups."""
        hashes = self.vocab_codes()
        order = np.argsort(hashes, kind="stable")
        return hashes[order], (order + 1).astype(np.int64)

    def encode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Canonical hashes (N,) -> embedding indices (N,), 0 for values outside the vocabulary
        (and for missing values)."""
        if self.hash_buckets is not None:
            bucket = (codes.view(np.uint64) % np.uint64(self.hash_buckets)).astype(np.int64) + 1
            return np.where(codes == NULL_CODE, 0, bucket)
        keys, index = self._lookup
        if keys.size == 0:
            return np.zeros(codes.shape, dtype=np.int64)
        pos = np.searchsorted(keys, codes).clip(0, keys.size - 1)
        return np.where(keys[pos] == codes, index[pos], 0)

    def encode_values(self, x: np.ndarray) -> np.ndarray:
        """Canonical floats (N,) -> standardised float32 (N,); missing values map to the mean (0)."""
        x = x.astype(np.float64)
        if self.log1p:
            x = np.log1p(np.clip(x, 0.0, None))
        z = (x - self.mean) / self.std
        z = np.where(np.isfinite(z), z, 0.0)
        return z.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.kind == "numeric":
            for k in ("vocab", "min_count", "max_size", "hash_buckets"):
                d.pop(k)
        else:
            for k in ("log1p", "mean", "std"):
                d.pop(k)
            if self.hash_buckets is None:
                d.pop("hash_buckets")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        known = {f for f in cls.__dataclass_fields__}
        extra = set(d) - known
        if extra:
            raise FeatureError(f"feature {d.get('name')!r}: unknown keys {sorted(extra)}")
        return cls(**dict(d))


@dataclass
class FeatureSchema:
    """Ordered features. Column order inside a group: categoricals, then numerics, as listed."""

    features: list[FeatureSpec] = field(default_factory=list)
    # entity key column of the user / video tables (also usable as an id feature)
    user_key: str = "user_id"
    video_key: str = "video_id"

    def __post_init__(self) -> None:
        for serving in (True, False):  # names are unique among serving features and among bias ones
            names = [f.name for f in self.features if (f.group != BIAS) == serving]
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise FeatureError(f"duplicate feature names: {sorted(dupes)}")

    # -- views -------------------------------------------------------------------------------
    def cats(self, group: AnyGroup | None = None) -> list[FeatureSpec]:
        """Categorical features of a group, or of all serving groups in group-major order (the model's)."""
        groups: tuple[AnyGroup, ...] = GROUPS if group is None else (group,)
        return [f for g in groups for f in self.features if f.kind == "categorical" and f.group == g]

    def nums(self, group: AnyGroup | None = None) -> list[FeatureSpec]:
        groups: tuple[AnyGroup, ...] = GROUPS if group is None else (group,)
        return [f for g in groups for f in self.features if f.kind == "numeric" and f.group == g]

    @property
    def bias(self) -> list[FeatureSpec]:
        """The training-only selection-bias features (empty for most models)."""
        return self.cats(BIAS)

    def serving(self) -> FeatureSchema:
        """A copy without the bias features."""
        return FeatureSchema(
            [f for f in self.features if f.group != BIAS], user_key=self.user_key, video_key=self.video_key
        )

    def columns(self, group: AnyGroup) -> tuple[list[str], list[str]]:
        """(categorical names, numeric names) of a group, in canonical column order."""
        return [f.name for f in self.cats(group)], [f.name for f in self.nums(group)]

    @property
    def n_cats(self) -> int:
        return len(self.cats())

    @property
    def n_nums(self) -> int:
        return len(self.nums())

    def key_of(self, group: Group) -> str | None:
        return {"user": self.user_key, "video": self.video_key}.get(group)

    # -- raw -> canonical --------------------------------------------------------------------
    def canonicalize_frame(self, group: AnyGroup, df: pd.DataFrame) -> CanonicalRows:
        cat_names, num_names = self.columns(group)
        missing = [c for c in cat_names + num_names if c not in df.columns]
        if missing:
            raise FeatureError(f"{group} table lacks feature columns {missing}")
        n = len(df)
        cats = np.empty((n, len(cat_names)), dtype=np.int64)
        nums = np.empty((n, len(num_names)), dtype=np.float32)
        for j, c in enumerate(cat_names):
            cats[:, j] = hash_series(object_values(df[c]))
        for j, c in enumerate(num_names):
            nums[:, j] = to_float(df[c])
        return CanonicalRows(cats, nums)

    def canonicalize_records(self, group: Group, records: Sequence[Mapping[str, Any]]) -> CanonicalRows:
        """Raw dict rows (a request's context or inline features) -> canonical rows.

        Keys that are not features of the group are ignored; absent features are missing values.
        Numeric values must be numbers (or numeric strings); anything else raises FeatureError.
        """
        cat_names, num_names = self.columns(group)
        cats = np.zeros((len(records), len(cat_names)), dtype=np.int64)
        nums = np.full((len(records), len(num_names)), np.nan, dtype=np.float32)
        for i, rec in enumerate(records):
            for j, c in enumerate(cat_names):
                if c in rec:
                    cats[i, j] = stable_hash(rec[c])
            for j, c in enumerate(num_names):
                if c in rec and rec[c] is not None:
                    nums[i, j] = _parse_number(group, c, rec[c])
        return CanonicalRows(cats, nums)

    def default_rows(self, group: Group, n: int) -> CanonicalRows:
        """Rows for unknown entities: every feature missing."""
        cat_names, num_names = self.columns(group)
        return CanonicalRows(
            np.zeros((n, len(cat_names)), dtype=np.int64),
            np.full((n, len(num_names)), np.nan, dtype=np.float32),
        )

    # -- fitting (train rows only) -----------------------------------------------------------
    def fit(
        self, frames: Mapping[AnyGroup, CanonicalRows], raw: Mapping[AnyGroup, pd.DataFrame]
    ) -> FeatureSchema:
        """Fit vocabularies and numeric statistics on training rows; returns a fitted copy.

        ``frames[g]`` are the canonical training rows of group g (one row per impression), ``raw[g]``
        the matching raw values (the vocabulary records raw strings, so the manifest is readable).
        The bias group is only needed (and fitted) when the schema has bias features. One batch of
        ``SchemaFitter``, which fits larger data batch by batch.
        """
        fitter = SchemaFitter(self)
        for g in ALL_GROUPS:
            if g == BIAS and not self.bias:
                continue
            cat_names, num_names = self.columns(g)
            if cat_names or num_names:
                fitter.update(g, [hash_column(raw[g][c]) for c in cat_names], frames[g].nums)
        return fitter.result()

    # -- canonical -> encoded ----------------------------------------------------------------
    def encode(self, group: AnyGroup, rows: CanonicalRows) -> tuple[np.ndarray, np.ndarray]:
        """Canonical rows -> (embedding indices (N, C) int64, standardised numerics (N, F) float32)."""
        cats = np.empty(rows.cats.shape, dtype=np.int64)
        for j, spec in enumerate(self.cats(group)):
            cats[:, j] = spec.encode_codes(rows.cats[:, j])
        nums = np.empty(rows.nums.shape, dtype=np.float32)
        for j, spec in enumerate(self.nums(group)):
            nums[:, j] = spec.encode_values(rows.nums[:, j])
        return cats, nums

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "user_key": self.user_key,
            "video_key": self.video_key,
            "features": [f.to_dict() for f in self.features],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSchema:
        try:
            return cls(
                [FeatureSpec.from_dict(f) for f in d["features"]],
                user_key=d.get("user_key", "user_id"),
                video_key=d.get("video_key", "video_id"),
            )
        except (KeyError, TypeError) as e:
            raise FeatureError(f"malformed feature schema: {e}") from e


# --------------------------------------------------------------------------------------------
# streaming fit: value counts and moments, memory bounded by the distinct values


class StringMap:
    """Canonical strings of hashes: sorted codes (U,) and their strings (a pyarrow array)."""

    def __init__(self, codes: np.ndarray, strings: pa.Array | Sequence[str]) -> None:
        order = np.argsort(codes, kind="stable")
        self.codes = np.asarray(codes, dtype=np.int64)[order]
        arr = strings if isinstance(strings, pa.Array) else pa.array(list(strings), type=pa.large_string())
        self.strings = arr.take(pa.array(order))

    @classmethod
    def of(cls, column: HashedColumn) -> StringMap:
        return cls(column.uniq_codes, column.uniq_strings)

    def lookup(self, codes: np.ndarray) -> pa.Array:
        """The strings of ``codes`` (each must be in the map)."""
        pos = np.searchsorted(self.codes, codes)
        if len(codes) and (pos.max() >= len(self.codes) or not (self.codes[pos] == codes).all()):
            raise FeatureError("a value's canonical string is missing from its column's map")
        return self.strings.take(pa.array(pos))


class CategoryCounter:
    """Streaming value counts of one categorical feature: (codes, counts, strings) merged in sorted
    code order, with memory bounded by the number of distinct values, not of rows."""

    def __init__(self) -> None:
        self.codes = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.strings: pa.Array = pa.array([], type=pa.large_string())
        self._pending: list[tuple[np.ndarray, np.ndarray, pa.Array]] = []
        self._pending_n = 0

    def add(self, codes: np.ndarray, names: StringMap) -> None:
        """Count the non-missing ``codes`` (N,) of a batch; ``names`` knows their strings."""
        c, n = np.unique(codes[codes != NULL_CODE], return_counts=True)
        self.add_counts(c, n.astype(np.int64), names.lookup(c))

    def add_counts(self, codes: np.ndarray, counts: np.ndarray, strings: pa.Array) -> None:
        self._pending.append((codes, counts, strings))
        self._pending_n += len(codes)
        if self._pending_n > max(1 << 20, len(self.codes)):
            self._merge()

    def merge(self, other: CategoryCounter) -> None:
        other._merge()
        self.add_counts(other.codes, other.counts, other.strings)

    def _merge(self) -> None:
        if not self._pending:
            return
        parts = [(self.codes, self.counts, self.strings), *self._pending]
        self._pending, self._pending_n = [], 0
        codes = np.concatenate([p[0] for p in parts])
        counts = np.concatenate([p[1] for p in parts])
        strings = pa.concat_arrays([p[2].cast(pa.large_string()) for p in parts])
        order = np.argsort(codes, kind="stable")
        codes = codes[order]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
        self.codes = codes[starts]
        self.counts = np.add.reduceat(counts[order], starts) if len(starts) else np.zeros(0, np.int64)
        self.strings = strings.take(pa.array(order[starts]))

    def result(self) -> tuple[np.ndarray, np.ndarray, pa.Array]:
        """(codes, counts, strings), sorted by code."""
        self._merge()
        return self.codes, self.counts, self.strings


@dataclass
class Moments:
    """Streaming count, mean and sum of squared deviations (Chan et al.'s parallel update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        x = x[np.isfinite(x)]
        if x.size:
            self.merge(Moments(int(x.size), float(x.mean()), float(((x - x.mean()) ** 2).sum())))

    def merge(self, o: Moments) -> None:
        if o.n == 0:
            return
        n = self.n + o.n
        delta = o.mean - self.mean
        self.m2 += o.m2 + delta * delta * self.n * o.n / n
        self.mean += delta * o.n / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 1.0


def natural_order(strings: Sequence[str]) -> np.ndarray:
    """The permutation that sorts strings numbers first (by value), then text (by string), like
    ``sorted(strings, key=_natural_key)``, vectorised for vocabularies of millions."""
    s = pd.Series(list(strings), dtype=object)
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
    is_num = ~np.isnan(num)
    idx_num, idx_txt = np.flatnonzero(is_num), np.flatnonzero(~is_num)
    order_num = idx_num[np.argsort(num[idx_num], kind="stable")]
    order_txt = idx_txt[np.argsort(s.to_numpy()[idx_txt], kind="stable")]
    return np.concatenate([order_num, order_txt]).astype(np.int64)


def select_vocab(
    spec: FeatureSpec, codes: np.ndarray, counts: np.ndarray, strings: pa.Array
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A categorical feature's vocabulary from its training value counts: values seen at least
    ``min_count`` times, the ``max_size`` most frequent (ties by value), in natural order.
    Returns (vocab, their codes, their counts) in index order."""
    keep = np.flatnonzero(counts >= spec.min_count)
    values: list[str] = strings.take(pa.array(keep)).to_pylist()
    codes, counts = codes[keep], counts[keep]
    if spec.max_size is not None and len(values) > spec.max_size:
        natural = natural_order(values)
        rank = np.empty(len(values), dtype=np.int64)
        rank[natural] = np.arange(len(values))
        top = np.lexsort((rank, -counts))[: spec.max_size]
        values, codes, counts = [values[i] for i in top], codes[top], counts[top]
    order = natural_order(values)
    return [values[i] for i in order], codes[order], counts[order]


class SchemaFitter:
    """Fits a schema's vocabularies and numeric statistics from batches of training rows."""

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.counters = {
            (f.group, f.name): CategoryCounter() for f in schema.features if f.kind == "categorical"
        }
        self.moments = {(f.group, f.name): Moments() for f in schema.features if f.kind == "numeric"}

    def update(self, group: AnyGroup, cats: Sequence[HashedColumn], nums: np.ndarray) -> None:
        """One batch of a group's training rows: hashed categorical columns (in schema column order)
        and canonical numeric columns (N, F)."""
        for spec, col in zip(self.schema.cats(group), cats, strict=True):
            self.update_counts(group, spec.name, col.codes, StringMap.of(col))
        for j, spec in enumerate(self.schema.nums(group)):
            x = nums[:, j].astype(np.float64)
            if spec.log1p:
                x = np.log1p(np.clip(x, 0.0, None))
            self.moments[(group, spec.name)].add(x)

    def update_counts(self, group: AnyGroup, name: str, codes: np.ndarray, names: StringMap) -> None:
        self.counters[(group, name)].add(codes, names)

    def merge(self, other: SchemaFitter) -> None:
        for k, c in other.counters.items():
            self.counters[k].merge(c)
        for k, m in other.moments.items():
            self.moments[k].merge(m)

    def result(self) -> FeatureSchema:
        fitted: list[FeatureSpec] = []
        for spec in self.schema.features:
            key = (spec.group, spec.name)
            if spec.kind == "numeric":
                m = self.moments[key]
                mean, std = (m.mean, m.std) if m.n else (0.0, 1.0)
                fitted.append(
                    FeatureSpec(**{**asdict(spec), "mean": mean, "std": std if std > 1e-8 else 1.0})
                )
            elif spec.hash_buckets is not None:
                fitted.append(FeatureSpec(**asdict(spec)))
            else:
                vocab, codes, _ = select_vocab(spec, *self.counters[key].result())
                out = FeatureSpec(**{**asdict(spec), "vocab": vocab})
                out.set_vocab_codes(codes)
                fitted.append(out)
        return FeatureSchema(fitted, user_key=self.schema.user_key, video_key=self.schema.video_key)


def strings_to_arrays(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings as (UTF-8 bytes (B,) uint8, offsets (V + 1,) int64), for safetensors files."""
    arr = pa.array(list(strings), type=pa.large_string())
    _, offsets, data = arr.buffers()
    off = (
        np.frombuffer(offsets, dtype=np.int64, count=len(arr) + 1).copy()
        if len(arr)
        else np.zeros(1, np.int64)
    )
    raw = (
        np.frombuffer(data, dtype=np.uint8, count=int(off[-1])).copy()
        if data is not None
        else np.zeros(0, np.uint8)
    )
    return raw, off - off[0]


def arrays_to_strings(raw: np.ndarray, offsets: np.ndarray) -> list[str]:
    n = len(offsets) - 1
    if n <= 0:
        return []
    arr = pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(raw.astype(np.uint8))
    )
    out: list[str] = arr.to_pylist()
    return out


def schema_to_arrays(schema: FeatureSchema, above: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The schema as JSON without its vocabularies of more than ``above`` values, plus those
    vocabularies as arrays (feature i's ``i.codes`` (V,) int64 in index order, ``i.bytes`` and
    ``i.offsets`` its strings), so a vocabulary of millions is a compact binary file and not a
    JSON list."""
    d = schema.to_dict()
    arrays: dict[str, np.ndarray] = {}
    for i, (f, fd) in enumerate(zip(schema.features, d["features"], strict=True)):
        if f.kind == "categorical" and f.vocab is not None and len(f.vocab) > above:
            arrays[f"{i}.codes"] = f.vocab_codes()
            arrays[f"{i}.bytes"], arrays[f"{i}.offsets"] = strings_to_arrays(f.vocab)
            fd["vocab"] = None
    return d, arrays


def schema_from_arrays(d: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> FeatureSchema:
    """Inverse of ``schema_to_arrays``."""
    schema = FeatureSchema.from_dict(d)
    for i, f in enumerate(schema.features):
        if f"{i}.codes" in arrays:
            f.vocab = arrays_to_strings(arrays[f"{i}.bytes"], arrays[f"{i}.offsets"])
            f.set_vocab_codes(arrays[f"{i}.codes"])
    return schema


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _short(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _parse_number(group: str, name: str, value: Any) -> float:
    """A finite number that fits float32, from a number or a numeric string; FeatureError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FeatureError(f"{group} feature {name!r} must be a number, got {type(value).__name__}")
    try:
        x = float(value)
    except ValueError:
        raise FeatureError(f"{group} feature {name!r} must be a number, got {_short(value)}") from None
    except OverflowError:  # an int beyond the float range
        raise FeatureError(f"{group} feature {name!r} is out of range, got {_short(value)}") from None
    if not math.isfinite(x):
        raise FeatureError(f"{group} feature {name!r} must be finite, got {_short(value)}")
    if abs(x) > FLOAT32_MAX:
        raise FeatureError(f"{group} feature {name!r} is out of range (|x| > {FLOAT32_MAX:.3g}), got {x:g}")
    return x


def _natural_key(s: str) -> tuple[int, float | str]:
    try:
        return (0, float(s))
    except ValueError:
        return (1, s)
