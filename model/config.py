"""Dataclass configs for data, tasks, model and training, loaded from one TOML file.

A config file has the sections ``[data]``, ``[[data.features]]``, ``[[tasks]]``, ``[model]``,
``[train]``, ``[objective]`` and ``[promotion]``; see ``configs/*.toml``. Unknown keys are errors (a
typo must not silently fall back to a default).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

Arch = Literal["separate", "shared_bottom", "mmoe", "ple", "conditioned"]
TaskKind = Literal["binary", "regression"]
Conditioning = Literal["concat", "add", "film"]
Weighting = Literal["static", "uncertainty", "mgda", "worst_case", "gradnorm", "pcgrad"]

ARCHS: tuple[str, ...] = ("separate", "shared_bottom", "mmoe", "ple", "conditioned")
CONDITIONINGS: tuple[str, ...] = ("concat", "add", "film")
WEIGHTINGS: tuple[str, ...] = ("static", "uncertainty", "mgda", "worst_case", "gradnorm", "pcgrad")
LossReference = Literal["constant", "initial"]

DATA_DIR_ENV = "MTRANK_DATA_DIR"


class ConfigError(ValueError):
    """A config file or section that cannot be used."""


@dataclass
class FeatureDecl:
    """A feature as declared in the config (before vocabularies / statistics are fitted)."""

    name: str
    group: Literal["user", "video", "context"]
    kind: Literal["categorical", "numeric"]
    min_count: int = 1
    max_size: int | None = None
    log1p: bool = False
    hash_buckets: int | None = None  # categorical: no vocabulary, 1 + hash mod this many rows


Pooling = Literal["attention", "mean"]
POOLINGS: tuple[str, ...] = ("attention", "mean")


@dataclass
class SequenceDecl:
    """A user behaviour history feature (``[[data.sequences]]``): each row's user's last ``max_len``
    events before the row's time, an event being a log row whose ``label`` column(s) are > 0 (e.g.
    long_view). The items are videos: the video key feature plus ``side_features`` (categorical
    video features), embedded with the candidates' own embedding rows; pooled by target attention
    against each candidate or by a mean (``model.sequences``)."""

    name: str
    label: str | list[str] = "long_view"  # a column, or columns whose logical OR makes an event
    max_len: int = 50
    pooling: Pooling = "attention"
    side_features: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [self.label] if isinstance(self.label, str) else list(self.label)


Split = Literal["time", "random", "column"]
SPLITS: tuple[str, ...] = ("time", "random", "column")
COLUMN_TYPES: tuple[str, ...] = ("string", "int64", "float64", "bool")


@dataclass
class DataConfig:
    source: Literal["kuairand", "tables"] = "kuairand"
    data_dir: str = "../shared/data/kuairand-pure"  # overridden by $MTRANK_DATA_DIR
    # the impression log: a file, a directory of files or a glob (CSV, CSV.gz or Parquet)
    log: str = "log_standard_20220425_to_20220508_pure.csv.gz"
    users: str | None = "user_features_pure.csv"
    videos: str | None = "video_features_basic_pure.csv"
    user_key: str | None = "user_id"  # "" = no user table / user ids (rows served by inline features)
    video_key: str | None = "video_id"
    # how rows become train / valid / test:
    #   "time":   split_column in train_range / test_range (or the last train_days + test_days of its
    #             distinct values); valid = the latest valid_fraction of the train rows by time_column
    #   "random": seeded by split_seed; test_fraction and valid_fraction of the rows
    #   "column": split_column holds "train", "valid" or "test" (other values are not used)
    split: Split = "time"
    time_column: str = "time_ms"
    split_column: str = "date"
    train_range: tuple[int, int] | None = None
    test_range: tuple[int, int] | None = None
    train_days: int | None = None  # relative to the data: the train_days values of split_column
    test_days: int | None = None  # before the last test_days ones (which are the test split)
    valid_fraction: float = 0.1
    test_fraction: float = 0.1  # split = "random"
    split_seed: int = 0  # split = "random"
    # drop rows identical in every column (None: on for source = "kuairand", whose logs hold exact
    # duplicates as artefacts; off otherwise). Dropped rows are counted in the data fingerprint.
    drop_duplicates: bool | None = None
    max_rows: int | None = None  # keep the first N log rows (smoke tests)
    # per-list metrics (GAUC, NDCG) group rows by these columns; None = [user_key] when there is one
    group_by: list[str] | None = None
    column_types: dict[str, str] = field(default_factory=dict)  # pin CSV column types
    cache_dir: str | None = None  # encoded shards (default: <artifacts>/cache, or a temp dir)
    shard_rows: int = 1 << 18  # rows per encoded shard
    read_batch_rows: int = 1 << 16  # rows per record batch read from the log
    features: list[FeatureDecl] = field(default_factory=list)
    # user behaviour histories (model.sequences); none by default
    sequences: list[SequenceDecl] = field(default_factory=list)

    def __post_init__(self) -> None:
        # TOML has no null: an empty string means "no such table / key"
        self.users = self.users or None
        self.videos = self.videos or None
        self.user_key = self.user_key or None
        self.video_key = self.video_key or None
        if self.train_range is not None:
            self.train_range = tuple(self.train_range)  # type: ignore[assignment]
        if self.test_range is not None:
            self.test_range = tuple(self.test_range)  # type: ignore[assignment]

    @property
    def dedup(self) -> bool:
        return self.source == "kuairand" if self.drop_duplicates is None else self.drop_duplicates

    @property
    def groups(self) -> list[str]:
        if self.group_by is not None:
            return list(self.group_by)
        return [self.user_key] if self.user_key else []

    def path(self, name: str) -> Path:
        p = Path(name)
        if p.is_absolute():
            return p
        return Path(os.environ.get(DATA_DIR_ENV) or self.data_dir) / p

    def check(self) -> None:
        """Value checks (called by Config)."""
        if self.split not in SPLITS:
            raise ConfigError(f"data.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError("data.valid_fraction must be in [0, 1)")
        if self.split == "random" and not (
            0.0 < self.test_fraction < 1.0 and self.valid_fraction + self.test_fraction < 1.0
        ):
            raise ConfigError("data.test_fraction must be in (0, 1) and valid_fraction + test_fraction < 1")
        if self.split == "time":
            days = (self.train_days, self.test_days)
            ranges = (self.train_range, self.test_range)
            if any(d is not None for d in days) and any(r is not None for r in ranges):
                raise ConfigError("data: give train_range / test_range or train_days / test_days, not both")
            if any(d is not None for d in days):
                if None in days or min(d for d in days if d is not None) < 1:
                    raise ConfigError("data.train_days and data.test_days must both be >= 1")
            elif None in ranges:
                raise ConfigError(
                    'data.split = "time" needs train_range and test_range (values of split_column), '
                    "or train_days and test_days (the last distinct values of split_column)"
                )
        bad = {k: v for k, v in self.column_types.items() if v not in COLUMN_TYPES}
        if bad:
            raise ConfigError(f"data.column_types: types must be one of {COLUMN_TYPES}, got {bad}")
        if self.shard_rows < 1 or self.read_batch_rows < 1:
            raise ConfigError("data.shard_rows and data.read_batch_rows must be >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError("data.max_rows must be >= 1")
        self.check_sequences()

    def check_sequences(self) -> None:
        """A history needs user ids, a time column and the video key as a categorical video
        feature; its side features are categorical video features; names are unique."""
        if not self.sequences:
            return
        names = [s.name for s in self.sequences]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"data.sequences: names must be unique and non-empty, got {names}")
        if not self.user_key or not self.video_key:
            raise ConfigError("data.sequences need data.user_key and data.video_key (histories are per user)")
        video_cats = {f.name for f in self.features if f.group == "video" and f.kind == "categorical"}
        for s in self.sequences:
            where = f"data.sequences {s.name!r}"
            if self.video_key not in video_cats:
                raise ConfigError(
                    f"{where}: the video key {self.video_key!r} must be declared as a categorical video "
                    "feature (history items share its embedding rows)"
                )
            if s.pooling not in POOLINGS:
                raise ConfigError(f"{where}: pooling must be one of {POOLINGS}, got {s.pooling!r}")
            if not 1 <= s.max_len <= 1000:
                raise ConfigError(f"{where}: max_len must be in [1, 1000], got {s.max_len}")
            if not s.labels or not all(isinstance(c, str) and c for c in s.labels):
                raise ConfigError(f"{where}: label must name a column or a list of columns")
            bad = [c for c in s.side_features if c not in video_cats or c == self.video_key]
            if bad or len(set(s.side_features)) != len(s.side_features):
                raise ConfigError(
                    f"{where}: side_features must be distinct categorical video features other than "
                    f"the key, got {s.side_features}"
                )


@dataclass
class TaskConfig:
    """One head. ``label`` is a column, or a list of columns whose logical OR is the label."""

    name: str
    kind: TaskKind = "binary"
    # a column; a list of columns (binary: their logical OR); or { column = "c", equals = v } (binary:
    # 1 where the column's value is v, or one of a list of values; missing values stay unobserved)
    label: str | list[str] | dict[str, Any] = "long_view"
    transform: Literal["none", "log1p"] = "none"  # regression targets only
    weight: float = 1.0  # static task weight w_i in sum_i w_i * L_i
    mask_by: str | None = None  # label observed only where this column is non-zero


@dataclass
class ModelConfig:
    """The network. Every field added after the first release has a default, so the configs stored
    in older checkpoints still load (and build the same network)."""

    arch: Arch = "mmoe"
    embed_dim: int = 16
    bottom_dims: list[int] = field(default_factory=lambda: [256, 128])  # shared_bottom/separate/conditioned
    n_experts: int = 4
    expert_dims: list[int] = field(default_factory=lambda: [128, 64])  # mmoe, ple (every level)
    tower_dims: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.1
    gate_dropout: float = 0.0  # mmoe / ple: drop whole experts from a gate while training (Zhao et al.)
    # ple (Tang et al. RecSys 2020): levels of (shared experts + per-task experts) with gates
    ple_levels: int = 2
    n_shared_experts: int = 2
    n_task_experts: int = 1
    # conditioned: one trunk (bottom_dims) + one head shared by all tasks, told the task by a learned
    # task embedding z_t: concatenated to the input, added to the input, or FiLM on every trunk layer
    conditioning: Conditioning = "concat"
    task_embed_dim: int = 16  # concat / film ("add" uses the input width)
    # position / selection bias (Zhao et al. RecSys 2019): a shallow tower on these categorical log
    # columns (never served) whose logit is added to the bias_tasks' logits in training only
    bias_features: list[str] = field(default_factory=list)
    bias_tasks: list[str] = field(default_factory=list)  # empty: the first task
    bias_dims: list[int] = field(default_factory=lambda: [16])
    bias_dropout: float = 0.1  # fraction of training rows whose bias features are set to "unknown"


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0  # Adam's L2 on every parameter ...
    embed_weight_decay: float | None = None  # ... but this on the embedding tables (None = the same)
    # mini-batch aware L2 (DIN): sum over the batch's embedding rows of ||w_j||^2 / count_j; 0 = off
    embed_batch_l2: float = 0.0
    # cold start: each training row's user (and, independently, video) features are replaced by the
    # serving defaults (unknown / mean) with this probability, so the network learns what it is
    # served for new users and videos; 0 = off (then the unknown rows are imputed after training)
    unknown_dropout: float = 0.0
    patience: int = 2  # non-improving epochs tolerated: training stops at the (patience + 1)-th in a row
    restore_best: bool = True  # end on the best validation epoch's weights (False: the last epoch's)
    # early stopping: valid/loss (the static objective), valid/<task>/<metric> (auc, gauc, logloss;
    # rmse, mae), valid/ndcg@10; "" = valid/loss
    monitor: str = ""
    seed: int = 0
    num_threads: int = 0  # 0 = torch default
    eval_batch_size: int = 8192
    log_every: int = 10  # steps between step-log records (loss, task losses, task weights); 0 = off
    # task weighting (model.weighting); tasks[].weight is used by "static" only
    weighting: Weighting = "static"
    worst_case_temperature: float = 0.1  # smooth max (log-sum-exp) of L_i / R_i; 0 = hard max
    # R_i: "constant" = the best constant predictor's loss on the training labels; "initial" = L_i(0)
    worst_case_reference: LossReference = "constant"
    gradnorm_alpha: float = 1.5  # GradNorm asymmetry
    gradnorm_lr: float = 0.01  # Adam learning rate of the GradNorm task weights
    # GradNorm's r_i = L_i / R_i, the same two choices ("initial" = the paper's L_i(0))
    gradnorm_reference: LossReference = "constant"
    # soft parameter sharing: tower_l2 * sum over task pairs of ||theta_a - theta_b||^2 (towers)
    tower_l2: float = 0.0
    # fine-tuning (mostly with `mtrank train --init-from`)
    lr_scale: float = 1.0  # effective learning rate = lr * lr_scale
    layer_lr_decay: float = 1.0  # towers get the lr, a layer `depth` below them lr * decay**depth
    freeze: list[str] = field(default_factory=list)  # top-level modules: embed, bottom, experts, ...
    reset_heads: bool = False  # re-initialise the towers' output layers (and the bias tower)
    # scale
    # embedding tables take sparse gradients and a lazy Adam (torch.optim.SparseAdam): a step reads
    # and updates only the rows its batch uses, so its cost does not grow with the vocabulary (no
    # coupled weight decay on the tables then: use embed_batch_l2)
    sparse_embeddings: bool = False
    shuffle_buffer: int = 1 << 20  # rows; a stream that fits is permuted whole each epoch
    # data streams (0 = the world size): stream s reads the fragments i with i % streams == s; one
    # process with streams = N reproduces an N-rank torchrun run step for step
    streams: int = 0
    device: str = "auto"  # a GPU when one is present, else the CPU; or "cpu", "cuda", "cuda:1"
    save_state: bool = True  # write the resumable training state after every epoch (with artifacts)


@dataclass
class PromotionConfig:
    """``[promotion]``: the gate a newly trained version passes before it becomes LATEST
    (``model.promotion``; ``mtrank train --force`` skips it)."""

    enabled: bool = True  # false: every new version becomes LATEST
    # test metrics compared with LATEST's ("test/loss", "test/<head>/auc", ...); empty = the test
    # counterpart of train.monitor and each head's primary metric (AUC for binary, RMSE for regression)
    metrics: list[str] = field(default_factory=list)
    max_regression: float = 0.005  # relative worsening tolerated per metric (0.005 = 0.5%)
    # a test split other than LATEST's makes the metrics incomparable: "refuse" to promote, or
    # "promote" on the heads and schema checks alone (e.g. daily retrains on a moving window)
    different_split: Literal["refuse", "promote"] = "refuse"

    def __post_init__(self) -> None:
        if not (self.max_regression >= 0):
            raise ConfigError(f"promotion.max_regression must be >= 0, got {self.max_regression}")
        if self.different_split not in ("refuse", "promote"):
            raise ConfigError(
                f'promotion.different_split must be "refuse" or "promote", got {self.different_split!r}'
            )


Fit = Literal["auto", "product", "sum", "off"]
FITS: tuple[str, ...] = ("auto", "product", "sum", "off")


@dataclass
class ObjectiveConfig:
    """``[objective]``: what a good ranking is (``model.objective``). After training, the served
    combination of the heads is fitted on the validation split to maximise NDCG@k of ``gain`` over
    the lists ``group_by`` makes; ``mtrank replay`` judges the served order by the same measure."""

    # a row's gain: sum of weight * value over log columns (missing = 0); empty = the sum of the
    # binary tasks' labels. Columns need not be task labels (e.g. { long_view = 1, is_like = 5 })
    gain: dict[str, float] = field(default_factory=dict)
    # the lists (one request's candidates): rows sharing these log columns; None = data.group_by
    group_by: list[str] | None = None
    k: int = 10  # NDCG@k, recall@k, mean gain of the top k
    min_list_size: int = 2  # shorter lists have no order to judge
    # the served combination to fit: "auto" = the better of product (all heads binary) and sum on
    # the validation split; "off" = none (the service's own defaults apply)
    fit: Fit = "auto"
    # Platt-scale a binary head (folded into its output layer) when that lowers the log loss of
    # held-out validation rows (model.combination.check_calibration); false: measure only
    calibrate: bool = True

    def lists(self, data: DataConfig) -> list[str]:
        return list(self.group_by) if self.group_by is not None else data.groups

    def check(self) -> None:
        bad = {c: w for c, w in self.gain.items() if not (isinstance(w, int | float) and 0 <= w < math.inf)}
        if bad:
            raise ConfigError(f"objective.gain: weights must be finite numbers >= 0, got {bad}")
        if self.gain and not any(w > 0 for w in self.gain.values()):
            raise ConfigError("objective.gain: at least one column needs a weight > 0")
        if self.k < 1 or self.min_list_size < 1:
            raise ConfigError("objective.k and objective.min_list_size must be >= 1")
        if self.fit not in FITS:
            raise ConfigError(f"objective.fit must be one of {', '.join(FITS)}, got {self.fit!r}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "mtrank"
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("a config needs at least one [[tasks]] entry")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}")
        for t in self.tasks:
            if t.kind not in ("binary", "regression"):
                raise ConfigError(f"task {t.name!r}: kind must be binary or regression")
            if t.weight < 0:
                raise ConfigError(f"task {t.name!r}: weight must be >= 0")
        m, tr = self.model, self.train
        if m.arch not in ARCHS:
            raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)}, got {m.arch!r}")
        if m.conditioning not in CONDITIONINGS:
            raise ConfigError(f"model.conditioning must be one of {CONDITIONINGS}, got {m.conditioning!r}")
        if m.arch == "ple" and min(m.ple_levels, m.n_shared_experts, m.n_task_experts) < 1:
            raise ConfigError("model: ple_levels, n_shared_experts and n_task_experts must be >= 1")
        if m.arch == "conditioned" and not m.bottom_dims:
            raise ConfigError("model: the conditioned arch needs bottom_dims (its shared trunk)")
        if m.bias_features:
            unknown = sorted(set(m.bias_tasks) - set(names))
            if unknown:
                raise ConfigError(f"model.bias_tasks must name configured tasks, got {m.bias_tasks!r}")
            if len(set(m.bias_features)) != len(m.bias_features):
                raise ConfigError(f"model.bias_features has duplicates: {m.bias_features!r}")
        if not 0.0 <= m.bias_dropout < 1.0:
            raise ConfigError("model.bias_dropout must be in [0, 1)")
        if tr.weighting not in WEIGHTINGS:
            raise ConfigError(f"train.weighting must be one of {', '.join(WEIGHTINGS)}, got {tr.weighting!r}")
        for key in ("worst_case_reference", "gradnorm_reference"):
            if getattr(tr, key) not in ("constant", "initial"):
                raise ConfigError(f'train.{key} must be "constant" or "initial", got {getattr(tr, key)!r}')
        for key, least in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("patience", 0)):
            if getattr(tr, key) < least:
                raise ConfigError(f"train.{key} must be >= {least}, got {getattr(tr, key)}")
        if not tr.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {tr.lr}")
        if tr.log_every < 0:
            raise ConfigError(f"train.log_every must be >= 0 (0 = no step log), got {tr.log_every}")
        if tr.worst_case_temperature < 0 or tr.tower_l2 < 0 or tr.gradnorm_lr <= 0:
            raise ConfigError("train: worst_case_temperature and tower_l2 must be >= 0, gradnorm_lr > 0")
        if tr.tower_l2 > 0 and m.arch == "conditioned":
            raise ConfigError("train.tower_l2: the conditioned arch has no per-task towers to tie together")
        if tr.weight_decay < 0 or (tr.embed_weight_decay is not None and tr.embed_weight_decay < 0):
            raise ConfigError("train: weight_decay and embed_weight_decay must be >= 0")
        if not 0.0 <= tr.unknown_dropout < 1.0:
            raise ConfigError(f"train.unknown_dropout must be in [0, 1), got {tr.unknown_dropout}")
        if tr.embed_batch_l2 < 0:
            raise ConfigError(f"train.embed_batch_l2 must be >= 0, got {tr.embed_batch_l2}")
        if tr.shuffle_buffer < 1 or tr.streams < 0:
            raise ConfigError("train.shuffle_buffer must be >= 1 and train.streams >= 0")
        if tr.sparse_embeddings:
            table_decay = tr.embed_weight_decay if tr.embed_weight_decay is not None else tr.weight_decay
            if table_decay > 0:
                raise ConfigError(
                    "train.sparse_embeddings: coupled weight decay would update every embedding row at "
                    "every step; set train.embed_weight_decay = 0 and regularise with train.embed_batch_l2"
                )
            if tr.weighting == "pcgrad":
                raise ConfigError(
                    "train.sparse_embeddings: PCGrad projects the whole shared gradient, embedding tables "
                    "included, so every step would cost the full tables; use dense embeddings"
                )
        if tr.lr_scale <= 0 or not 0.0 < tr.layer_lr_decay <= 1.0:
            raise ConfigError("train: lr_scale must be > 0 and layer_lr_decay in (0, 1]")
        self.data.check()
        self.objective.check()
        if self.objective.fit == "product" and any(t.kind != "binary" for t in self.tasks):
            raise ConfigError('objective.fit = "product" multiplies probabilities: every task must be binary')
        for t in self.tasks:
            if isinstance(t.label, dict):
                if set(t.label) != {"column", "equals"} or not isinstance(t.label["column"], str):
                    raise ConfigError(
                        f'task {t.name!r}: a label expression is {{ column = "name", equals = value or '
                        f"[values] }}, got {t.label!r}"
                    )
                if t.kind != "binary":
                    raise ConfigError(f"task {t.name!r}: a label expression (equals) makes a binary label")
            elif not t.label:
                raise ConfigError(f"task {t.name!r}: label must name a column")

    def check_monitor(self) -> None:
        """``train.monitor`` must name a metric training reports (a typo would silently stop early
        on nothing)."""
        m = self.train.monitor
        if m == "":
            return
        parts = m.split("/")
        by_kind = {"binary": ("auc", "gauc", "logloss"), "regression": ("rmse", "mae")}
        ok = False
        if len(parts) == 2 and parts[0] in ("valid", "train"):
            ok = parts[1] == "loss" or (parts[1] == "ndcg@10" and any(t.kind == "binary" for t in self.tasks))
        elif len(parts) == 3 and parts[0] in ("valid", "train"):
            ok = any(t.name == parts[1] and parts[2] in by_kind[t.kind] for t in self.tasks)
        if not ok:
            names = ["valid/loss"] + [f"valid/{t.name}/{k}" for t in self.tasks for k in by_kind[t.kind]]
            raise ConfigError(f"train.monitor {m!r} names no metric of this config; one of {names}")

    @property
    def monitor(self) -> str:
        return self.train.monitor or "valid/loss"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        d = dict(d)
        data = dict(d.pop("data", {}))
        feats = [_build(FeatureDecl, f, "data.features") for f in data.pop("features", [])]
        seqs = [_build(SequenceDecl, q, "data.sequences") for q in data.pop("sequences", [])]
        for k in ("train_range", "test_range"):
            if data.get(k) is not None:
                data[k] = tuple(data[k])
        cfg = cls(
            data=_build(DataConfig, {**data, "features": feats, "sequences": seqs}, "data"),
            tasks=[_build(TaskConfig, t, "tasks") for t in d.pop("tasks", [])],
            model=_build(ModelConfig, d.pop("model", {}), "model"),
            train=_build(TrainConfig, d.pop("train", {}), "train"),
            name=str(d.pop("name", "mtrank")),
            promotion=_build(PromotionConfig, d.pop("promotion", {}), "promotion"),
            objective=_build(ObjectiveConfig, d.pop("objective", {}), "objective"),
        )
        if d:
            raise ConfigError(f"unknown top-level config keys: {sorted(d)}")
        return cfg


T = TypeVar("T")


def _build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"[{where}] unknown keys: {sorted(unknown)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"[{where}] {e}") from e


def apply_overrides(cfg: Config, assignments: list[str]) -> Config:
    """``section.key=value`` assignments (``train.lr=0.01``, ``data.log="logs/*.parquet"``,
    ``model.expert_dims=[64, 32]``) applied to a config, re-validated. A value is read as TOML, and
    as a plain string when it is not TOML."""
    d = cfg.to_dict()
    for a in assignments:
        key, sep, text = a.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ConfigError(f"--set {a!r}: want section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node: Any = d
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--set {a!r}: no config section {'.'.join(path[:-1])!r}")
            node = node[part]
        if not isinstance(node, dict) or path[-1] not in node:
            raise ConfigError(f"--set {a!r}: no config key {key.strip()!r}")
        node[path[-1]] = value
    out = Config.from_dict(d)
    out.check_monitor()
    return out


def load_config(path: str | Path) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e
    raw.setdefault("name", p.stem)
    cfg = Config.from_dict(raw)
    cfg.check_monitor()
    return cfg
