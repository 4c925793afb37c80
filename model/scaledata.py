"""KuaiRand-Pure replicated to any number of log rows, for scale benchmarks (``mtrank data scale``).

Copy c of the log gets fresh user ids (user_id + c * offset; copy 0 keeps the originals) and its
times jittered by up to +-30 s; the users table is replicated with the same ids, the videos table
is shared. Rows identical in the source stay identical in every copy (the jitter is a hash of the
row), so the duplicate artefacts scale with the log. Written as Parquet: the log as files of
``file_rows`` rows in row groups of ``row_group_rows`` (the fragments ``torchrun`` ranks split),
``user_features.parquet`` and ``video_features.parquet``. Memory is bounded by one copy of the log.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

LOG = "log_standard_20220425_to_20220508_pure.csv.gz"
USERS = "user_features_pure.csv"
VIDEOS = "video_features_basic_pure.csv"
JITTER_MS = 30_000


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def scale_kuairand(
    source: Path,
    out: Path,
    rows: int,
    *,
    seed: int = 0,
    file_rows: int = 1 << 20,
    row_group_rows: int = 1 << 17,
) -> dict[str, Path]:
    """Write ``rows`` log rows (KuaiRand-Pure copies with fresh user ids) and the matching tables."""
    if rows < 1:
        raise ValueError("rows must be >= 1")
    log = pd.read_csv(source / LOG)
    users = pd.read_csv(source / USERS)
    videos = pd.read_csv(source / VIDEOS)
    offset = 10 ** len(str(int(max(log["user_id"].max(), users["user_id"].max()))))
    copies = math.ceil(rows / len(log))
    (out / "log").mkdir(parents=True, exist_ok=True)
    # the jitter is a function of the row's content, so duplicate rows stay duplicates
    content = pd.util.hash_pandas_object(log, index=False).to_numpy(dtype=np.uint64)
    schema = pa.Schema.from_pandas(log, preserve_index=False)
    writer: pq.ParquetWriter | None = None
    in_file, n_files, written = 0, 0, 0
    for c in range(copies):
        part = log.iloc[: min(len(log), rows - written)].copy()
        jitter = _mix(content[: len(part)] ^ np.uint64(seed * 1_000_003 + c)) % np.uint64(2 * JITTER_MS + 1)
        part["time_ms"] = part["time_ms"].to_numpy() + jitter.astype(np.int64) - JITTER_MS
        part["user_id"] = part["user_id"].to_numpy() + c * offset
        start = 0
        while start < len(part):
            if writer is None:
                writer = pq.ParquetWriter(out / "log" / f"part-{n_files:05d}.parquet", schema)
                n_files += 1
            take = min(len(part) - start, file_rows - in_file)
            table = pa.Table.from_pandas(part.iloc[start : start + take], schema=schema, preserve_index=False)
            writer.write_table(table, row_group_size=row_group_rows)
            start, in_file = start + take, in_file + take
            if in_file >= file_rows:
                writer.close()
                writer, in_file = None, 0
        written += len(part)
    if writer is not None:
        writer.close()
    user_schema = pa.Schema.from_pandas(users, preserve_index=False)
    with pq.ParquetWriter(out / "user_features.parquet", user_schema) as w:
        for c in range(copies):
            w.write_table(
                pa.Table.from_pandas(
                    users.assign(user_id=users["user_id"] + c * offset),
                    schema=user_schema,
                    preserve_index=False,
                )
            )
    videos.to_parquet(out / "video_features.parquet", index=False)
    meta = {
        "source": str(source),
        "rows": written,
        "copies": copies,
        "user_offset": offset,
        "seed": seed,
        "log_files": n_files,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return {
        "log": out / "log",
        "users": out / "user_features.parquet",
        "videos": out / "video_features.parquet",
    }
