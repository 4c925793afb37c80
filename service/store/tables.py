"""Entity tables -> canonical rows keyed by id: used by the embedded store and by ``materialize``."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model import (
    CanonicalRows,
    DataConfig,
    DataError,
    FeatureError,
    FeatureSchema,
    FeatureSpec,
    LogSource,
    canonical_str,
    object_values,
    read_table,
)
from service.store.base import EntityGroup, GroupLayout, StoreError

log = logging.getLogger(__name__)


def entity_id(value: int | str) -> str:
    """The one string form of an id, used for store keys: str(int) for ints, strings as they are."""
    return str(value) if isinstance(value, int) else value


def table_path(data: DataConfig, group: EntityGroup, data_dir: Path | None = None) -> Path | None:
    """Where a group's table is: ``data_dir`` (when given) or the checkpoint's data config."""
    name = data.users if group == "user" else data.videos
    if name is None:
        return None
    if data_dir is not None and not Path(name).is_absolute():
        return Path(data_dir) / name
    return data.path(name)


@dataclass(frozen=True)
class EntityRows:
    """Canonical rows of every entity of a table, in a given layout."""

    ids: list[str]
    rows: CanonicalRows
    layout: GroupLayout
    source: str


def load_entity_rows(
    data: DataConfig, group: EntityGroup, layout: GroupLayout, data_dir: Path | None = None
) -> EntityRows:
    """Read a user / video table and canonicalise the layout's columns (StoreError on any problem).

    A config without a table for the group gives zero rows: every entity is then unknown.
    """
    path = table_path(data, group, data_dir)
    if path is None:
        log.warning("no %s table configured: every %s gets default features", group, group)
        empty = CanonicalRows(
            np.zeros((0, len(layout.cats)), dtype=np.int64), np.zeros((0, len(layout.nums)), dtype=np.float32)
        )
        return EntityRows([], empty, layout, "none")
    try:
        df = read_table(path)
    except DataError as e:
        raise StoreError(str(e)) from e
    if layout.key not in df.columns:
        raise StoreError(f"{group} table {path} has no key column {layout.key!r}")
    keys = pd.Series([canonical_str(v) for v in object_values(df[layout.key])], index=df.index, dtype=object)
    df = df.assign(_key=keys).dropna(subset=["_key"]).drop_duplicates(subset=["_key"], keep="last")
    specs = [FeatureSpec(c, group, "categorical") for c in layout.cats]
    specs += [FeatureSpec(c, group, "numeric") for c in layout.nums]
    try:
        rows = FeatureSchema(specs).canonicalize_frame(group, df)
    except FeatureError as e:
        raise StoreError(f"{path}: {e}") from e
    return EntityRows([str(k) for k in df["_key"]], rows, layout, str(path))


def log_unknown_rates(
    data: DataConfig, ids: dict[str, list[str]], data_dir: Path | None = None
) -> dict[str, float] | None:
    """Share of the log's impressions whose user / video has no row among ``ids`` (group -> ids):
    the unknown-rate serving should expect. Streams the log's key columns (any size, any number of
    files). None (logged) when the log cannot be read."""
    if data_dir is not None and not Path(data.log).is_absolute():
        data = dataclasses.replace(data, data_dir=str(data_dir))
    keys = {g: k for g, k in (("user", data.user_key), ("video", data.video_key)) if k}
    if not keys:
        return None
    try:
        source = LogSource(data, data.read_batch_rows)
        known = {g: set(ids.get(g, [])) for g in keys}
        unknown, rows = dict.fromkeys(keys, 0), 0
        for frag in source.fragments:
            for df in source.batches(frag, list(keys.values())):
                rows += len(df)
                for g, key in keys.items():
                    counts = df[key].value_counts(dropna=False)  # each distinct id once
                    unknown[g] += sum(int(n) for v, n in counts.items() if canonical_str(v) not in known[g])
    except DataError as e:
        log.warning("expected unknown-rate not recorded: %s", e)
        return None
    if rows == 0:
        return None
    return {g: round(unknown[g] / rows, 4) for g in keys}
