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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd

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
    s = canonical_str(value)
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


def to_float(values: pd.Series | Sequence[Any] | np.ndarray) -> np.ndarray:
    """Numeric canonical form: float32, NaN for missing or unparsable values."""
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)


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

    def __post_init__(self) -> None:
        if self.group not in ALL_GROUPS:
            raise FeatureError(
                f"feature {self.name!r}: group must be one of {ALL_GROUPS}, got {self.group!r}"
            )
        if self.group == BIAS and self.kind != "categorical":
            raise FeatureError(f"bias feature {self.name!r} must be categorical")
        if self.kind not in ("categorical", "numeric"):
            raise FeatureError(f"feature {self.name!r}: kind must be categorical or numeric")

    @property
    def cardinality(self) -> int:
        """Embedding rows: vocabulary size plus the unknown row 0."""
        return len(self.vocab or []) + 1

    @cached_property
    def _lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted hashes, embedding index for each) for vectorised vocabulary look-ups."""
        hashes = np.array([stable_hash(v) for v in self.vocab or []], dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        return hashes[order], (order + 1).astype(np.int64)

    def encode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Canonical hashes (N,) -> embedding indices (N,), 0 for values outside the vocabulary."""
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
            for k in ("vocab", "min_count", "max_size"):
                d.pop(k)
        else:
            for k in ("log1p", "mean", "std"):
                d.pop(k)
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
        The bias group is only needed (and fitted) when the schema has bias features.
        """
        fitted: list[FeatureSpec] = []
        for g in ALL_GROUPS:
            if g == BIAS and not self.bias:
                continue
            cat_names, num_names = self.columns(g)
            for j, spec in enumerate(self.cats(g)):
                values = pd.Series(object_values(raw[g][cat_names[j]])).map(canonical_str).dropna()
                counts = values.value_counts(sort=True)
                counts = counts[counts >= spec.min_count]
                if spec.max_size is not None:
                    counts = counts.iloc[: spec.max_size]
                vocab = sorted(counts.index.astype(str), key=_natural_key)
                fitted.append(FeatureSpec(**{**asdict(spec), "vocab": vocab}))
            for j, spec in enumerate(self.nums(g)):
                x = frames[g].nums[:, j].astype(np.float64)
                x = x[np.isfinite(x)]
                if spec.log1p:
                    x = np.log1p(np.clip(x, 0.0, None))
                mean = float(x.mean()) if x.size else 0.0
                std = float(x.std()) if x.size else 1.0
                fitted.append(
                    FeatureSpec(**{**asdict(spec), "mean": mean, "std": std if std > 1e-8 else 1.0})
                )
        del num_names
        order = {(f.group == BIAS, f.name): i for i, f in enumerate(self.features)}
        fitted.sort(key=lambda f: order[(f.group == BIAS, f.name)])
        return FeatureSchema(fitted, user_key=self.user_key, video_key=self.video_key)

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


def concat_rows(parts: Iterable[CanonicalRows]) -> CanonicalRows:
    parts = list(parts)
    return CanonicalRows(np.concatenate([p.cats for p in parts]), np.concatenate([p.nums for p in parts]))
