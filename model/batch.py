"""Batch scoring of a file (``mtrank predict``): the serving encoder and network, offline.

The input (a CSV / CSV.gz / Parquet file, a directory or a glob) is read in record batches the way
training reads a log (``LogSource``: the same CSV type inference, the checkpoint's
``data.column_types``, KuaiRand's derived ``hour``), so memory is bounded by one batch. Each batch
becomes the model's canonical rows group by group, as training joined them and as the feature
store serves them:

* ``user`` / ``video`` features held by the checkpoint's users / videos table are read from the
  table by the row's key, when the file has the key column (``EntityTable``, duplicate keys: the
  last row, as in training and in the feature store). A key the table lacks gets missing features
  (the unknown row / the training mean), and a declared key feature is the hashed key itself: what
  ``/rank`` does for an unknown id;
* every other feature (``context`` features, entity features without a table) is the file's column
  of that name; a feature the file lacks is missing (scored as ``/rank`` scores an absent key).

The rows are then encoded with the checkpoint's fitted schema (``Ranker.encode``), scored by the
network, and combined into one score as the service combines them (by default the combination
fitted for the model's objective after training; without one, or with another ``combine``, weight 1
per head and the product of probabilities when every head is binary, else the sum). The output
holds the input's columns (all, or ``keep``), then ``score`` and one ``score_<head>`` column per
head, row for row; it is written to a temporary file renamed into place at the end, so a failed run
leaves no partial output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from model.data.prepare import add_derived, derived_columns
from model.data.source import DataError, EntityTable, LogSource, file_kind
from model.features import GROUPS, CanonicalRows, Group, hash_column, numeric_column
from model.scoring import Combine, Ranker, combine_for, combine_scores

log = logging.getLogger(__name__)

SCORE = "score"
HEAD_PREFIX = "score_"


@dataclass
class PredictReport:
    """What a ``predict_file`` run did."""

    output: Path
    rows: int = 0
    batches: int = 0
    heads: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # the output's columns
    joined: dict[str, str] = field(default_factory=dict)  # group -> table joined by key
    missing: list[str] = field(default_factory=list)  # features the file lacks (scored as missing)
    unknown_keys: dict[str, int] = field(default_factory=dict)  # group -> rows whose key the table lacks
    combine: str = "product"
    weights: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def output_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".csv.gz"):
        return "csv.gz"
    raise DataError(f"--output {path.name}: unsupported file type (want .parquet, .csv or .csv.gz)")


class _Writer:
    """Record batches -> a Parquet or CSV file, written under a temporary name."""

    def __init__(self, path: Path) -> None:
        self.path, self.kind = path, output_kind(path)
        self.tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        self._pq: pq.ParquetWriter | None = None
        self._csv: pacsv.CSVWriter | None = None
        self._sink: Any = None
        self.schema: pa.Schema | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            self.schema = batch.schema
            if self.kind == "parquet":
                self._pq = pq.ParquetWriter(self.tmp, self.schema)
            else:
                self._sink = (
                    pa.CompressedOutputStream(str(self.tmp), "gzip")
                    if self.kind == "csv.gz"
                    else str(self.tmp)
                )
                self._csv = pacsv.CSVWriter(self._sink, self.schema)
        elif batch.schema != self.schema:
            batch = pa.RecordBatch.from_arrays(
                [c.cast(f.type) for c, f in zip(batch.columns, self.schema, strict=True)], schema=self.schema
            )
        if self._pq is not None:
            self._pq.write_batch(batch)
        elif self._csv is not None:
            self._csv.write_batch(batch)

    def close(self, empty_schema: pa.Schema) -> None:
        if self.schema is None:  # no rows: still a file with the columns
            self.write(_empty_batch(empty_schema))
        if self._pq is not None:
            self._pq.close()
        if self._csv is not None:
            self._csv.close()
            if self.kind == "csv.gz":
                self._sink.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        for w in (self._pq, self._csv):
            try:
                if w is not None:
                    w.close()
            except (OSError, pa.ArrowException):
                pass
        self.tmp.unlink(missing_ok=True)


def _empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)


class _Rows:
    """Canonical rows of a batch for one group: tables by key, then the file's columns."""

    def __init__(
        self, ranker: Ranker, group: Group, table: EntityTable | None, columns: set[str], source_name: str
    ) -> None:
        self.schema, self.group, self.table, self.source_name = ranker.schema, group, table, source_name
        self.cats, self.nums = self.schema.columns(group)
        held = set(table.columns) if table is not None else set()
        self.missing = [c for c in self.cats + self.nums if c not in held and c not in columns]
        self.file_columns = [c for c in self.cats + self.nums if c not in held and c in columns]

    def rows(self, df: pd.DataFrame, row0: int) -> tuple[CanonicalRows, int]:
        """(canonical rows, rows whose key the table lacks)."""
        n = len(df)
        t = self.table
        where, unknown = None, 0
        if t is not None:
            keys = hash_column(df[t.key]).codes
            where = t.locate(keys)
            unknown = int(((where < 0) & (keys != 0)).sum())
        cats = np.zeros((n, len(self.cats)), dtype=np.int64)
        for j, c in enumerate(self.cats):
            if t is not None and c in t.cats:
                assert where is not None
                cats[:, j] = t.cat_codes(c, where)
            elif c in df.columns:
                cats[:, j] = hash_column(df[c]).codes
        nums = np.full((n, len(self.nums)), np.nan, dtype=np.float32)
        for j, c in enumerate(self.nums):
            if t is not None and c in t.nums:
                assert where is not None
                nums[:, j] = t.num_values(c, where)
            elif c in df.columns:
                nums[:, j] = numeric_column(df[c], c, self.source_name, row0)
        return CanonicalRows(cats, nums), unknown


def predict_file(
    ranker: Ranker,
    input: str | Path,
    output: str | Path,
    *,
    keep: Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    combine: Combine | None = None,
    batch_rows: int = 1 << 16,
    data_dir: str | Path | None = None,
) -> PredictReport:
    """Score every row of ``input`` into ``output`` (see the module doc). ``DataError`` on bad input."""
    started = time.perf_counter()
    src, out = Path(input), Path(output)
    output_kind(out)
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise DataError("--output must not be the input file")
    if not out.parent.is_dir():
        raise DataError(f"--output: no such directory {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise DataError(f"--output: cannot write in {out.parent}")
    if batch_rows < 1:
        raise DataError("--batch-rows must be >= 1")
    if ranker.schema.sequences:
        names = [q.name for q in ranker.schema.sequences]
        raise DataError(
            f"model {ranker.version} reads user histories {names}: `mtrank predict` does not build them "
            "(score such rows through /rank, or evaluate the model with `mtrank evaluate`)"
        )
    d = ranker.config.data
    source = LogSource(dataclasses.replace(d, log=str(src.absolute())), batch_rows)
    have = source.columns()
    derived = derived_columns(d, have)
    columns = set(have) | set(derived)
    heads = ranker.task_names
    fitted = ranker.combination  # the service's default: the combination fitted after training
    if weights is None and fitted is not None and combine in (None, fitted.method):
        weights, combine = fitted.weights, fitted.method
    weights = dict(weights) if weights is not None else dict.fromkeys(heads, 1.0)
    unknown = sorted(set(weights) - set(heads))
    if unknown:
        raise DataError(f"--weight: unknown head(s) {unknown}; this model's heads are {heads}")
    if not any(w > 0 for w in weights.values()):
        raise DataError("--weight: at least one head needs a weight > 0")
    method = combine or combine_for(ranker.tasks)

    report = PredictReport(out, heads=heads, combine=method, weights=weights)
    groups: dict[Group, _Rows] = {}
    for g in GROUPS:
        table = None
        name = d.users if g == "user" else d.videos if g == "video" else None
        key = ranker.schema.key_of(g)
        cats, nums = ranker.schema.columns(g)
        if name is not None and key and key in have and (cats or nums):
            path = (
                Path(data_dir) / name
                if data_dir is not None and not Path(name).is_absolute()
                else d.path(name)
            )
            table = EntityTable(path, key, cats, nums)
            report.joined[g] = str(table.path)
        groups[g] = _Rows(ranker, g, table, columns, src.name)
        report.missing += [f"{g}.{c}" for c in groups[g].missing]
    n_features = sum(len(r.cats) + len(r.nums) for r in groups.values())
    if len(report.missing) == n_features:
        keys = [k for k in (ranker.schema.user_key, ranker.schema.video_key) if k]
        raise DataError(
            f"{src.name} has none of the model's feature columns ({', '.join(report.missing)})"
            + (f" and none of its keys ({', '.join(keys)})" if keys else "")
            + "; its columns are "
            + ", ".join(have[:30])
        )
    kept = list(have) if keep is None else list(keep)
    absent = [c for c in kept if c not in have]
    if absent:
        raise DataError(f"--keep: {src.name} has no column(s) {absent}")
    score_cols = [SCORE] + [HEAD_PREFIX + h for h in heads]
    clash = [c for c in score_cols if c in kept]
    if clash:
        raise DataError(
            f"the output's score columns {clash} are columns of {src.name} too: name the input columns "
            "to copy with --keep"
        )
    report.columns = kept + score_cols
    read = list(dict.fromkeys([*kept, *(c for c in have if c in _needed(groups, derived))]))
    writer = _Writer(out)
    try:
        row0 = 0
        for frag in source.fragments:
            for rb in source.record_batches(frag, read):
                df = add_derived(rb.to_pandas(), derived)
                parts: dict[Group, CanonicalRows] = {}
                for g, r in groups.items():
                    parts[g], unk = r.rows(df, row0)
                    if unk:
                        report.unknown_keys[g] = report.unknown_keys.get(g, 0) + unk
                scores = ranker.score_encoded(*ranker.encode(parts["user"], parts["video"], parts["context"]))
                combined = combine_scores(scores, weights, method)
                arrays = [rb.column(rb.schema.get_field_index(c)) for c in kept]
                arrays += [pa.array(combined, pa.float64())]
                arrays += [pa.array(scores[h], pa.float64()) for h in heads]
                writer.write(pa.RecordBatch.from_arrays(arrays, names=report.columns))
                row0 += len(df)
                report.batches += 1
        report.rows = row0
        kept_schema = source_schema(source, kept)
        writer.close(pa.schema([*kept_schema, *(pa.field(c, pa.float64()) for c in score_cols)]))
    except pa.ArrowException as e:  # e.g. files of a glob whose columns' types differ
        writer.abort()
        raise DataError(f"cannot score {src.name}: {str(e).splitlines()[0]}") from e
    except BaseException:
        writer.abort()
        raise
    report.seconds = time.perf_counter() - started
    log.info("predict: %d rows of %s scored into %s in %.1fs", report.rows, src, out, report.seconds)
    return report


def _needed(groups: Mapping[Group, _Rows], derived: Sequence[str]) -> set[str]:
    """The file's columns scoring reads: keys of joined tables, feature columns, derived sources."""
    cols: set[str] = set()
    for r in groups.values():
        cols.update(r.file_columns)
        if r.table is not None:
            cols.add(r.table.key)
    if derived:
        cols.add("hourmin")
    return cols


def source_schema(source: LogSource, columns: Sequence[str]) -> list[pa.Field]:
    """Arrow fields of ``columns`` for an output with no rows: the Parquet file's types; text for a
    CSV file (whose header is all an empty output shows)."""
    path = source.files[0]
    if file_kind(path) == "parquet":
        schema = pq.ParquetFile(path).schema_arrow
        return [schema.field(c) for c in columns]
    return [pa.field(c, pa.string()) for c in columns]
