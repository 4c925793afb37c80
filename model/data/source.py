"""Reading the inputs: the impression log as fragments read in record batches, and entity tables.

The log is one file, a directory or a glob (``data.log``, relative to ``data.data_dir``) of CSV,
CSV.gz or Parquet files. It is read in *fragments* -- a Parquet row group, or a whole CSV file --
each in record batches of bounded size (pyarrow), so no pass over the log holds more than one
batch. Fragments are numbered in file order; under ``torchrun`` rank r reads fragments i with
i % world_size == r only.

CSV types are inferred from a file's first block, like pandas but with dates kept as text (a
date-like string stays the string the file holds); ``data.column_types`` pins a column's type.

Entity tables (users, videos) are read whole: they are joined to each log batch by hashing the
key (``EntityTable``), with memory bounded by the table, not the log.
"""

from __future__ import annotations

import glob
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from model.config import DataConfig
from model.features import NULL_CODE, StringMap, hash_column, numeric_column
from model.files import sha256_file

log = logging.getLogger(__name__)

# pandas' default missing-value strings (read_csv's na_values), so CSV files read as pandas reads them
NULL_STRINGS = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
]  # fmt: skip
ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
CSV_BLOCK_BYTES = 1 << 24  # type inference reads this much of each CSV file


class DataError(ValueError):
    """Input data that cannot be used (missing file or column, empty split, bad labels)."""


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    return None


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a whole CSV / CSV.gz / Parquet file (entity tables)."""
    if not path.is_file():
        hint = (
            " (a relative data_dir is resolved against the working directory; set MTRANK_DATA_DIR to"
            " the data folder)"
            if not path.is_absolute()
            else ""
        )
        raise DataError(f"data file not found: {path}{hint}")
    kind = file_kind(path)
    try:
        if kind == "parquet":
            return pd.read_parquet(path, columns=columns)
        if kind == "csv":
            return pd.read_csv(path, usecols=columns, low_memory=False)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    raise DataError(f"unsupported file type (want .csv, .csv.gz or .parquet): {path}")


def file_fingerprint(path: Path) -> dict[str, Any]:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def resolve_files(cfg: DataConfig) -> list[Path]:
    """The log's files: ``data.log`` names a file, a directory (every CSV / Parquet file below it)
    or a glob pattern; sorted by path."""
    spec = cfg.path(cfg.log)
    if spec.is_dir():
        files = [p for p in spec.rglob("*") if p.is_file() and file_kind(p) is not None]
    elif glob.has_magic(str(spec)):
        files = [Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file()]
    else:
        if not spec.is_file():
            read_table(spec)  # the not-found error with its data_dir hint
        files = [spec]
    files = sorted(files, key=str)
    if not files:
        raise DataError(f"no log files match {spec}")
    bad = [p.name for p in files if file_kind(p) is None]
    if bad:
        raise DataError(f"unsupported log file type (want .csv, .csv.gz or .parquet): {bad[:3]}")
    return files


@dataclass(frozen=True)
class Fragment:
    """A unit of the log read by one process: a Parquet row group or a whole CSV file."""

    index: int  # position in the log's fragment list (owner rank = index % world size)
    path: Path
    row_group: int | None  # Parquet row group; None for a CSV file
    rows: int | None  # known for Parquet (file metadata), None for CSV


class LogSource:
    """The impression log as fragments; each fragment is read in record batches (pandas frames)."""

    def __init__(self, cfg: DataConfig, batch_rows: int = 1 << 16) -> None:
        self.cfg = cfg
        self.batch_rows = batch_rows
        self.files = resolve_files(cfg)
        self.fragments: list[Fragment] = []
        self.read_fragments: set[int] = set()  # fragments this process has read rows of
        self._csv_types: dict[Path, dict[str, pa.DataType]] = {}
        self._columns: dict[Path, list[str]] = {}
        for path in self.files:
            if file_kind(path) == "parquet":
                try:
                    meta = pq.ParquetFile(path).metadata
                except (pa.ArrowException, OSError) as e:
                    raise DataError(f"cannot read {path}: {e}") from e
                self._columns[path] = list(meta.schema.to_arrow_schema().names)
                for rg in range(meta.num_row_groups):
                    rows = meta.row_group(rg).num_rows
                    self.fragments.append(Fragment(len(self.fragments), path, rg, rows))
            else:
                self._columns[path] = self._probe_csv(path)
                self.fragments.append(Fragment(len(self.fragments), path, None, None))
            repeated = sorted(c for c, k in Counter(self._columns[path]).items() if k > 1)
            if repeated:
                raise DataError(f"{path.name}: column name(s) {repeated} appear more than once")

    # -- schema ------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        """The columns every log file has (in the first file's order)."""
        first = self._columns[self.files[0]]
        common = set.intersection(*(set(c) for c in self._columns.values()))
        return [c for c in first if c in common]

    def _probe_csv(self, path: Path) -> list[str]:
        """Column names and types of a CSV file from its first block: inferred as pandas would,
        except that dates and all-missing columns stay text; ``data.column_types`` wins."""
        try:
            with pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                convert_options=self._convert_options({}),
            ) as reader:
                schema = reader.schema
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        types: dict[str, pa.DataType] = {}
        for f in schema:
            t = f.type
            if pa.types.is_temporal(t) or pa.types.is_null(t):
                t = pa.string()
            types[f.name] = t
        for name, tname in self.cfg.column_types.items():
            if name in types:
                types[name] = ARROW_TYPES[tname]
        self._csv_types[path] = types
        return list(schema.names)

    @staticmethod
    def _convert_options(types: dict[str, pa.DataType], columns: Sequence[str] | None = None) -> Any:
        return pacsv.ConvertOptions(
            column_types=types,
            include_columns=list(columns) if columns is not None else None,
            null_values=NULL_STRINGS,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )

    # -- reading -----------------------------------------------------------------------------
    def batches(self, frag: Fragment, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        """The fragment's rows in order, as frames of at most ``batch_rows`` rows (CSV: one block)."""
        for rb in self.record_batches(frag, columns):
            yield rb.to_pandas()

    def record_batches(
        self, frag: Fragment, columns: Sequence[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """``batches`` as Arrow record batches (the file's own column types)."""
        have = self._columns[frag.path]
        self.read_fragments.add(frag.index)
        if columns is not None:
            missing = [c for c in columns if c not in have]
            if missing:
                raise DataError(f"log file {frag.path.name} has no column(s) {missing}")
        try:
            if frag.row_group is not None:
                pf = pq.ParquetFile(frag.path)
                yield from pf.iter_batches(
                    batch_size=self.batch_rows, row_groups=[frag.row_group], columns=list(columns or have)
                )
                return
            types = self._csv_types[frag.path]
            with pacsv.open_csv(
                frag.path,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                convert_options=self._convert_options(types, columns),
            ) as reader:
                for rb in reader:
                    for start in range(0, rb.num_rows, self.batch_rows):
                        yield rb.slice(start, self.batch_rows)
        except pa.ArrowInvalid as e:
            m = re.search(r"column #(\d+)", str(e))
            col = f" (column {have[int(m.group(1))]!r})" if m and int(m.group(1)) < len(have) else ""
            raise DataError(
                f"cannot read {frag.path.name}{col}: {str(e).splitlines()[0]}. A CSV column's type is "
                "inferred from the file's first 16 MB: pin it with data.column_types, or use Parquet"
            ) from e
        except OSError as e:
            raise DataError(f"cannot read {frag.path}: {e}") from e


# --------------------------------------------------------------------------------------------
# entity tables


def load_entity_table(cfg: DataConfig, group: str) -> pd.DataFrame | None:
    """A user or video table as a frame (None when the config has none); duplicate keys keep the
    last row."""
    name = cfg.users if group == "user" else cfg.videos
    key = cfg.user_key if group == "user" else cfg.video_key
    if name is None or key is None:
        return None
    df = read_table(cfg.path(name))
    if key not in df.columns:
        raise DataError(f"{group} table {name} has no key column {key!r}")
    return df.drop_duplicates(subset=[key], keep="last").reset_index(drop=True)


class EntityTable:
    """A user or video table, joined to log batches by the hash of its key.

    Only the features declared for the table's group that are columns of the table are read
    (the key itself comes from the log). Duplicate keys keep the last row, as before. Each
    categorical column is kept as small integers into its distinct values' hashes, so a table of
    millions of users costs a few bytes per user and feature."""

    def __init__(self, path: Path, key: str, cat_names: Sequence[str], num_names: Sequence[str]) -> None:
        columns = self._columns(path)
        if key not in columns:
            raise DataError(f"table {path.name} has no key column {key!r}")
        self.path, self.key = path, key
        self.cat_names = [c for c in cat_names if c in columns and c != key]
        self.num_names = [c for c in num_names if c in columns and c != key]
        # a Parquet table is read one column at a time (a table of millions of users never sits in
        # memory as a frame); a CSV table is parsed once
        whole = None if file_kind(path) == "parquet" else read_table(path, columns=[key, *self.columns])

        def column(name: str) -> pd.Series:
            if whole is not None:
                return whole[name]
            try:
                out: pd.Series = pq.read_table(path, columns=[name]).column(0).to_pandas()
                return out
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"cannot read {path}: {e}") from e

        all_keys = hash_column(column(key)).codes
        last = ~pd.Series(all_keys).duplicated(keep="last").to_numpy()  # duplicate keys: the last row
        keys = all_keys[last]
        del all_keys
        self.rows = len(keys)
        order = np.argsort(keys, kind="stable")
        self._keys, self._pos = keys[order], order
        self._codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # (row -> value index, value hashes)
        self.names: dict[str, StringMap] = {}
        for c in self.cat_names:
            h = hash_column(column(c)[last].reset_index(drop=True))
            values, inverse = np.unique(h.codes, return_inverse=True)
            small = np.min_scalar_type(max(len(values) - 1, 0))
            self._codes[c] = (inverse.astype(small), values)
            self.names[c] = StringMap.of(h)
        self.nums: dict[str, np.ndarray] = {
            c: numeric_column(column(c)[last].reset_index(drop=True), c, path.name) for c in self.num_names
        }

    @staticmethod
    def _columns(path: Path) -> list[str]:
        if not path.is_file():
            read_table(path)  # the not-found error with its hint
        try:
            if file_kind(path) == "parquet":
                return list(pq.ParquetFile(path).schema_arrow.names)
            return list(pd.read_csv(path, nrows=0).columns)
        except (ValueError, OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read {path}: {e}") from e

    @property
    def columns(self) -> list[str]:
        return self.cat_names + self.num_names

    @property
    def cats(self) -> dict[str, None]:
        """The table's categorical features (membership tests)."""
        return dict.fromkeys(self.cat_names)

    def locate(self, key_codes: np.ndarray) -> np.ndarray:
        """Row of each key (N,) in the table, -1 where the table has none."""
        if not len(self._keys):
            return np.full(len(key_codes), -1, dtype=np.int64)
        pos = np.searchsorted(self._keys, key_codes).clip(0, len(self._keys) - 1)
        hit = (self._keys[pos] == key_codes) & (key_codes != NULL_CODE)
        return np.where(hit, self._pos[pos], -1)

    def cat_codes(self, name: str, rows: np.ndarray) -> np.ndarray:
        inverse, values = self._codes[name]
        return np.where(rows >= 0, values[inverse[rows.clip(0)]], NULL_CODE)

    def num_values(self, name: str, rows: np.ndarray) -> np.ndarray:
        x = self.nums[name]
        return np.where(rows >= 0, x[rows.clip(0)], np.float32(np.nan)).astype(np.float32)
