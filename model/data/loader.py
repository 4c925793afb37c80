"""Encoded rows for the trainer: in-memory splits, shard-backed splits, and shuffled batch streams.

A split is read as *parts*: an in-memory ``Split`` is one part, a ``ShardedSplit`` one part per
shard file (loaded when read). Training batches come from *streams*: stream s of S holds the rows
of the fragments with index % S == s. Under ``torchrun`` S is the world size and rank r reads only
stream r; one process reads all S streams and concatenates their batches, which reproduces an
S-rank run step for step (``train.streams``).

Each epoch a stream is shuffled: when it fits in ``train.shuffle_buffer`` rows it is held in memory
and permuted whole (``rng.permutation``, as an in-memory trainer does); otherwise its shards are
read in a seeded random order through a shuffle buffer of that many rows.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from model.config import Config
from model.data.prepare import Exchange, Prepared, ShardInfo, prepare
from model.features import FeatureSchema

log = logging.getLogger(__name__)

CACHE_ENV = "MTRANK_CACHE_DIR"


@dataclass
class Split:
    """Model-ready rows: indices (N, C), numerics (N, F) float32, labels (N, T) float32 (NaN = not
    observed), list group ids (N,) for per-list metrics (GAUC, NDCG)."""

    cats: np.ndarray
    nums: np.ndarray
    labels: np.ndarray
    users: np.ndarray  # (N,) group ids (data.group_by; by default the user)
    bias: np.ndarray | None = None  # (N, Cb) logged bias-feature indices (training only)
    times: np.ndarray | None = None  # (N,) the log's time column (orders rows for time-based CV)
    fragments: np.ndarray | None = None  # (N,) the log fragment of each row (streams)
    gain: np.ndarray | None = None  # (N,) float64 the [objective]'s gain (model.objective)
    lists: np.ndarray | None = None  # (N,) the [objective]'s list ids (objective.group_by)
    # user histories (model.data.history): seq.<name>.items (N, L, K) int32, seq.<name>.len (N,)
    seqs: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray | slice) -> Split:
        def t(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Split(
            self.cats[idx],
            self.nums[idx],
            self.labels[idx],
            self.users[idx],
            t(self.bias),
            t(self.times),
            t(self.fragments),
            t(self.gain),
            t(self.lists),
            {k: v[idx] for k, v in self.seqs.items()},
        )

    def parts(self) -> Iterator[Split]:
        yield self

    @staticmethod
    def concat(parts: Sequence[Split]) -> Split:
        def c(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        cats, nums, labels, users = (
            np.concatenate([getattr(p, k) for p in parts]) for k in ("cats", "nums", "labels", "users")
        )
        out = Split(cats, nums, labels, users)
        out.bias, out.times, out.fragments = c("bias"), c("times"), c("fragments")
        out.gain, out.lists = c("gain"), c("lists")
        out.seqs = {k: np.concatenate([p.seqs[k] for p in parts]) for k in parts[0].seqs} if parts else {}
        return out


def load_shard(root: Path, info: ShardInfo) -> Split:
    a = load_file(str(root / info.file))
    return Split(
        a["cats"],
        a["nums"],
        a["labels"],
        a["groups"],
        a.get("bias"),
        a.get("times"),
        np.full(info.rows, info.fragment, dtype=np.int32),
        a.get("gain"),
        a.get("lists"),
        {k: v for k, v in a.items() if k.startswith("seq.")},
    )


class ShardedSplit:
    """A split's rows in shard files, read one shard at a time."""

    def __init__(self, root: Path, shards: Sequence[ShardInfo]) -> None:
        self.root, self.shards = root, list(shards)

    def __len__(self) -> int:
        return sum(s.rows for s in self.shards)

    def parts(self) -> Iterator[Split]:
        for s in self.shards:
            yield load_shard(self.root, s)

    def materialize(self) -> Split:
        parts = list(self.parts())
        return Split.concat(parts) if parts else empty_split(self.root)

    @property
    def labels(self) -> np.ndarray:
        """All labels (N, T) (e.g. a weighting's constant-predictor reference)."""
        return (
            np.concatenate([p.labels for p in self.parts()]) if self.shards else np.zeros((0, 0), np.float32)
        )


def empty_split(root: Path | None = None, shapes: Split | None = None) -> Split:
    if shapes is not None:
        return shapes.take(slice(0, 0))
    z = np.zeros((0, 0))
    return Split(z.astype(np.int64), z.astype(np.float32), z.astype(np.float32), np.zeros(0, np.int64))


AnySplit = Split | ShardedSplit


@dataclass
class Dataset:
    schema: FeatureSchema  # fitted on the train split only
    train: AnySplit
    valid: AnySplit
    test: AnySplit
    fingerprint: dict[str, Any]
    label_stats: list[dict[str, float]] | None = None  # per task: n, mean, var (train labels)
    row_counts: np.ndarray | None = None  # (R,) train rows per embedding row
    grouped: bool = True  # group ids are meaningful (GAUC / NDCG)
    # the log fragments of every train row's stream, global (all ranks'): rows per fragment
    fragment_rows: dict[int, int] = field(default_factory=dict)


def cache_root(cfg: Config, artifacts: str | Path | None) -> Path | None:
    """Where encoded shards are kept: data.cache_dir, $MTRANK_CACHE_DIR, or <artifacts>/cache."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(artifacts) / "cache" if artifacts is not None else None


def prepare_data(
    cfg: Config,
    artifacts: str | Path | None = None,
    *,
    schema: FeatureSchema | None = None,
    exchange: Exchange | None = None,
    cache_dir: str | Path | None = None,
) -> Prepared:
    root = Path(cache_dir) if cache_dir is not None else cache_root(cfg, artifacts)
    if root is None:
        raise ValueError("prepare_data needs a cache folder (data.cache_dir, $MTRANK_CACHE_DIR or artifacts)")
    return prepare(cfg, root, schema=schema, exchange=exchange)


def sharded(p: Prepared, fragments: set[int] | None = None) -> Dataset:
    """The prepared data as shard-backed splits (only ``fragments``' shards when given)."""
    train = p.split_shards("train", fragments)
    rows: dict[int, int] = {}
    for s in p.split_shards("train"):
        rows[s.fragment] = rows.get(s.fragment, 0) + s.rows
    return Dataset(
        p.schema,
        ShardedSplit(p.root, train),
        ShardedSplit(p.root, p.split_shards("valid", fragments)),
        ShardedSplit(p.root, p.split_shards("test", fragments)),
        dict(p.fingerprint),
        p.label_stats,
        p.row_counts,
        p.grouped,
        rows,
    )


def materialize(p: Prepared) -> Dataset:
    """The prepared data in memory (small data, tuning, tests)."""
    ds = sharded(p)

    def mat(s: AnySplit) -> Split:
        return s.materialize() if isinstance(s, ShardedSplit) else s

    train = mat(ds.train)
    ds.train, ds.valid, ds.test = train, mat(ds.valid), mat(ds.test)
    for name in ("valid", "test"):
        if len(getattr(ds, name)) == 0:
            setattr(ds, name, empty_split(shapes=train))
    return ds


def load_dataset(
    cfg: Config, schema: FeatureSchema | None = None, cache_dir: str | Path | None = None
) -> Dataset:
    """Load, label, split and encode a config's data into memory (one process). Vocabularies and
    statistics are fitted on the train split, unless a fitted ``schema`` is given (fine-tuning: the
    source checkpoint's, so embedding rows keep their meaning)."""
    if cache_dir is not None or cache_root(cfg, None) is not None:
        return materialize(prepare_data(cfg, schema=schema, cache_dir=cache_dir))
    with tempfile.TemporaryDirectory(prefix="mtrank-data-") as tmp:
        return materialize(prepare(cfg, tmp, schema=schema))


# --------------------------------------------------------------------------------------------
# batches


def iter_batches(split: AnySplit, batch_size: int) -> Iterator[Split]:
    """A split's rows in order, in batches of at most ``batch_size`` (a batch never spans parts)."""
    for part in split.parts():
        for i in range(0, len(part), batch_size):
            yield part.take(slice(i, i + batch_size))


class Stream:
    """One stream's training rows: the parts of ``split`` whose fragments belong to it, shuffled
    each epoch by its own generator (``rng``) in batches of ``batch`` rows."""

    def __init__(
        self,
        split: AnySplit,
        stream: int,
        n_streams: int,
        rng: np.random.Generator,
        buffer_rows: int,
    ) -> None:
        self.split, self.stream, self.n_streams, self.rng, self.buffer_rows = (
            split,
            stream,
            n_streams,
            rng,
            buffer_rows,
        )
        self._resident: Split | None = None
        if isinstance(split, ShardedSplit):
            self.shards = [s for s in split.shards if s.fragment % n_streams == stream]
            self.rows = sum(s.rows for s in self.shards)
        else:
            self.shards = []
            self.rows = len(self._mine(split))

    def _mine(self, part: Split) -> Split:
        if self.n_streams == 1:
            return part
        if part.fragments is None:
            return part if self.stream == 0 else part.take(slice(0, 0))
        return part.take(np.flatnonzero(part.fragments % self.n_streams == self.stream))

    def steps(self, batch: int) -> int:
        return -(-self.rows // batch)

    def epoch(self, batch: int) -> Iterator[Split]:
        if self.rows <= self.buffer_rows:
            if self._resident is None:
                if isinstance(self.split, ShardedSplit):
                    parts = [load_shard(self.split.root, s) for s in self.shards]
                else:
                    parts = [self._mine(p) for p in self.split.parts()]
                self._resident = Split.concat(parts) if len(parts) != 1 else parts[0]
            data = self._resident
            perm = self.rng.permutation(len(data))
            for i in range(0, len(data), batch):
                yield data.take(perm[i : i + batch])
            return
        assert isinstance(self.split, ShardedSplit)
        pool: Split | None = None
        keep = max(self.buffer_rows // 2, batch)
        for k in self.rng.permutation(len(self.shards)):
            part = load_shard(self.split.root, self.shards[k])
            pool = part if pool is None else Split.concat([pool, part])
            if len(pool) >= self.buffer_rows:
                pool = pool.take(self.rng.permutation(len(pool)))
                emit = (len(pool) - keep) // batch * batch
                for i in range(0, emit, batch):
                    yield pool.take(slice(i, i + batch))
                pool = pool.take(slice(emit, None))
        if pool is not None and len(pool):
            pool = pool.take(self.rng.permutation(len(pool)))
            for i in range(0, len(pool), batch):
                yield pool.take(slice(i, i + batch))


def stream_rng(seed: int, stream: int, n_streams: int) -> np.random.Generator:
    """Stream s of S shuffles with this generator (one stream: ``default_rng(seed)``)."""
    return np.random.default_rng(seed if n_streams == 1 else [seed, stream, n_streams])


def epoch_steps(streams: Sequence[Stream], batch: int) -> int:
    return max((s.steps(batch) for s in streams), default=0)


def zip_streams(
    streams: Sequence[Stream], batch: int, steps: int, transform: Callable[[int, Split], Split] | None = None
) -> Iterator[list[Split | None]]:
    """``steps`` steps of one sub-batch per stream (None once a stream is exhausted)."""
    its = [s.epoch(batch) for s in streams]
    for _ in range(steps):
        out: list[Split | None] = []
        for k, it in enumerate(its):
            b = next(it, None)
            out.append(b if b is None or transform is None else transform(k, b))
        yield out
