"""The in-memory data loader mtrank used before the streaming one (pandas, whole log in memory),
kept verbatim as the reference the streaming path is tested against (``test_data_stream``)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.config import Config, DataConfig, TaskConfig
from model.features import (
    ALL_GROUPS,
    BIAS,
    GROUPS,
    AnyGroup,
    CanonicalRows,
    FeatureSchema,
    FeatureSpec,
    Group,
    _natural_key,
    canonical_str,
    object_values,
)

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used (missing file or column, empty split, bad labels)."""


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV / CSV.gz / Parquet file."""
    if not path.is_file():
        hint = (
            " (a relative data_dir is resolved against the working directory; set MTRANK_DATA_DIR to"
            " the data folder)"
            if not path.is_absolute()
            else ""
        )
        raise DataError(f"data file not found: {path}{hint}")
    name = path.name.lower()
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            return pd.read_parquet(path, columns=columns)
        if name.endswith(".csv") or name.endswith(".csv.gz"):
            return pd.read_csv(path, usecols=columns, low_memory=False)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    raise DataError(f"unsupported file type (want .csv, .csv.gz or .parquet): {path}")


def file_fingerprint(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def schema_from_config(cfg: DataConfig, bias_features: Sequence[str] = ()) -> FeatureSchema:
    """Unfitted schema of the declared features, plus ``bias_features`` (categorical log columns)."""
    specs = [
        FeatureSpec(
            name=f.name, group=f.group, kind=f.kind, min_count=f.min_count, max_size=f.max_size, log1p=f.log1p
        )
        for f in cfg.features
    ]
    specs += [FeatureSpec(name=name, group=BIAS, kind="categorical") for name in bias_features]
    return FeatureSchema(specs, user_key=cfg.user_key, video_key=cfg.video_key)


# --------------------------------------------------------------------------------------------
# raw tables


@dataclass
class RawData:
    log: pd.DataFrame  # impressions joined with user and video features
    users: pd.DataFrame | None
    videos: pd.DataFrame | None
    fingerprint: dict[str, Any]


def load_entity_table(cfg: DataConfig, group: Group) -> pd.DataFrame | None:
    name = cfg.users if group == "user" else cfg.videos
    if name is None:
        return None
    key = cfg.user_key if group == "user" else cfg.video_key
    df = read_table(cfg.path(name))
    if key not in df.columns:
        raise DataError(f"{group} table {name} has no key column {key!r}")
    return df.drop_duplicates(subset=[key], keep="last").reset_index(drop=True)


def load_raw(cfg: DataConfig) -> RawData:
    log_path = cfg.path(cfg.log)
    df = read_table(log_path)
    fp: dict[str, Any] = {"log": file_fingerprint(log_path)}
    if cfg.max_rows is not None:
        df = df.iloc[: cfg.max_rows]
    for col in (cfg.user_key, cfg.video_key, cfg.split_column, cfg.time_column):
        if col not in df.columns:
            raise DataError(f"log {log_path.name} has no column {col!r}")
    n0 = len(df)
    if cfg.drop_duplicates:
        df = df.drop_duplicates().reset_index(drop=True)
    fp["log_rows"], fp["duplicates_dropped"] = n0, n0 - len(df)
    if cfg.source == "kuairand" and "hourmin" in df.columns:
        df["hour"] = (df["hourmin"] // 100).astype("int64")

    users, videos = load_entity_table(cfg, "user"), load_entity_table(cfg, "video")
    for group, table, key in (("user", users, cfg.user_key), ("video", videos, cfg.video_key)):
        if table is None:
            continue
        name = cfg.users if group == "user" else cfg.videos
        assert name is not None
        fp[group + "s"] = file_fingerprint(cfg.path(name))
        # only the table's declared features are joined, and each must come from its own table,
        # which is what serving reads: a same-named log (or users table) column is an error
        declared = [f.name for f in cfg.features if f.group == group and f.name in table.columns]
        declared = [c for c in declared if c != key]
        clash = [c for c in declared if c in df.columns]
        if clash:
            raise DataError(
                f"{group} feature(s) {clash} are columns of the {name} table and also of the log"
                f"{' or the users table' if group == 'video' else ''}: training would read the other"
                " column while serving reads the table's; rename one of them"
            )
        df = df.merge(table[[key, *declared]], on=key, how="left", validate="many_to_one")
    return RawData(df, users, videos, fp)


def build_labels(df: pd.DataFrame, tasks: list[TaskConfig]) -> np.ndarray:
    """Label matrix (N, T) float32; NaN where a label is not observed (masked in the loss)."""
    out = np.empty((len(df), len(tasks)), dtype=np.float32)
    for t, task in enumerate(tasks):
        cols = [task.label] if isinstance(task.label, str) else list(task.label)
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise DataError(f"task {task.name!r}: label columns {missing} not in the log")
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
            y = np.where(df[task.mask_by].to_numpy() > 0, y, np.nan)
        out[:, t] = y
    return out


# --------------------------------------------------------------------------------------------
# encoded splits


@dataclass
class Split:
    """Model-ready rows: indices (N, C) int64, numerics (N, F) float32, labels (N, T) float32."""

    cats: np.ndarray
    nums: np.ndarray
    labels: np.ndarray
    users: np.ndarray  # (N,) group ids for per-user metrics (GAUC, NDCG)
    bias: np.ndarray | None = None  # (N, Cb) int64 logged bias-feature indices (training only)
    times: np.ndarray | None = None  # (N,) the log's time column (orders rows for time-based CV)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    schema: FeatureSchema  # fitted on the train split only
    train: Split
    valid: Split
    test: Split
    fingerprint: dict[str, Any]


def canonical_groups(schema: FeatureSchema, df: pd.DataFrame) -> dict[Group, CanonicalRows]:
    return {g: schema.canonicalize_frame(g, df) for g in GROUPS}


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


def encode_groups(schema: FeatureSchema, rows: dict[Group, CanonicalRows]) -> tuple[np.ndarray, np.ndarray]:
    """Encode each group and concatenate in the model's group-major column order."""
    parts = [schema.encode(g, rows[g]) for g in GROUPS]
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)


def split_masks(df: pd.DataFrame, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = df[cfg.split_column].to_numpy()
    train = (s >= cfg.train_range[0]) & (s <= cfg.train_range[1])
    test = (s >= cfg.test_range[0]) & (s <= cfg.test_range[1])
    valid = np.zeros_like(train)
    if cfg.valid_fraction > 0 and train.any():
        t = df[cfg.time_column].to_numpy()
        cut = np.quantile(t[train], 1.0 - cfg.valid_fraction)
        valid = train & (t > cut)
        train = train & ~valid
    for name, m in (("train", train), ("test", test)):
        if not m.any():
            raise DataError(f"the {name} split is empty: check data.{name}_range against {cfg.split_column}")
    return train, valid, test


def load_dataset(cfg: Config, schema: FeatureSchema | None = None) -> Dataset:
    """Load, label, split by time and encode. Vocabularies and statistics are fitted on the train
    split, unless a fitted ``schema`` is given (fine-tuning: the source checkpoint's, so embedding
    rows keep their meaning); its serving features must match the config's. Bias features
    (``model.bias_features``) are taken from ``schema`` when it has exactly those, else fitted."""
    raw = load_raw(cfg.data)
    df = raw.log
    declared = schema_from_config(cfg.data, cfg.model.bias_features)
    if not declared.serving().features:
        raise DataError("no features declared: add [[data.features]] entries to the config")
    missing = [c for c in cfg.model.bias_features if c not in df.columns]
    if missing:
        raise DataError(f"model.bias_features {missing} are not columns of the log")
    labels = build_labels(df, cfg.tasks)
    train_m, valid_m, test_m = split_masks(df, cfg.data)
    canon = canonical_groups(declared, df)
    bias_rows = declared.canonicalize_frame(BIAS, df) if declared.bias else None
    frames: dict[AnyGroup, CanonicalRows] = {g: rows.take(train_m) for g, rows in canon.items()}
    if bias_rows is not None:
        frames[BIAS] = bias_rows.take(train_m)
    raw_frames: dict[AnyGroup, pd.DataFrame] = {g: df.loc[train_m] for g in (*GROUPS, BIAS)}
    if schema is None:
        schema = reference_fit(declared, frames, raw_frames)
    else:
        check_same_features(schema, declared)
        if [f.name for f in schema.bias] != list(cfg.model.bias_features):
            fitted_bias = reference_fit(declared, frames, raw_frames).bias
            schema = FeatureSchema(
                schema.serving().features + fitted_bias, user_key=schema.user_key, video_key=schema.video_key
            )
    cats, nums = encode_groups(schema, canon)
    bias = schema.encode(BIAS, bias_rows)[0] if bias_rows is not None else None
    users = pd.factorize(df[cfg.data.user_key])[0].astype(np.int64)
    times = df[cfg.data.time_column].to_numpy()

    def split(m: np.ndarray) -> Split:
        return Split(cats[m], nums[m], labels[m], users[m], None if bias is None else bias[m], times[m])

    ds = Dataset(schema, split(train_m), split(valid_m), split(test_m), dict(raw.fingerprint))
    ds.fingerprint.update(
        {"train_rows": len(ds.train), "valid_rows": len(ds.valid), "test_rows": len(ds.test)}
    )
    log.info("data: train=%d valid=%d test=%d rows", len(ds.train), len(ds.valid), len(ds.test))
    return ds


def reference_fit(
    self: FeatureSchema, frames: Mapping[AnyGroup, CanonicalRows], raw: Mapping[AnyGroup, pd.DataFrame]
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
            fitted.append(FeatureSpec(**{**asdict(spec), "mean": mean, "std": std if std > 1e-8 else 1.0}))
    del num_names
    order = {(f.group == BIAS, f.name): i for i, f in enumerate(self.features)}
    fitted.sort(key=lambda f: order[(f.group == BIAS, f.name)])
    return FeatureSchema(fitted, user_key=self.user_key, video_key=self.video_key)
