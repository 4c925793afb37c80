"""Configs for data, tasks, model and training, loaded from one TOML file.

A config file has the sections ``[data]``, ``[[data.features]]``, ``[[tasks]]``, ``[model]``,
``[train]``, ``[objective]`` and ``[promotion]``; see ``configs/*.toml``. The parts that only some
choices have sit in their own table, a discriminated union: the architecture's keys in
``[model.<arch>]`` (``[model.mmoe] n_experts = 8``), a task weighting's in
``[train.weighting.<kind>]`` (``[train.weighting.gradnorm] alpha = 1.5``; ``weighting = "mgda"``
for a scheme without keys). The classes are pydantic dataclasses: types are checked strictly (a
string is not a number, 4.0 is not an integer), unknown keys are errors (a typo must not silently
fall back to a default), and ``Config.check`` holds the rules that span fields.

The configs stored in older checkpoints had every key flat in ``[model]`` and ``[train]``;
``Config.from_dict(d, legacy=True)`` (the checkpoint reader) moves them to their tables.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

Arch = Literal["separate", "shared_bottom", "mmoe", "ple", "conditioned"]
TaskKind = Literal["binary", "regression"]
Conditioning = Literal["concat", "add", "film"]
WeightingKind = Literal["static", "uncertainty", "mgda", "worst_case", "gradnorm", "pcgrad"]

ARCHS: tuple[str, ...] = ("separate", "shared_bottom", "mmoe", "ple", "conditioned")
CONDITIONINGS: tuple[str, ...] = ("concat", "add", "film")
WEIGHTINGS: tuple[str, ...] = ("static", "uncertainty", "mgda", "worst_case", "gradnorm", "pcgrad")
LossReference = Literal["constant", "initial"]

DATA_DIR_ENV = "MTRANK_DATA_DIR"

# strict types, unknown keys refused; dicts are validated in JSON mode (objects for dataclasses,
# arrays for tuples)
PART = ConfigDict(extra="forbid", strict=True)


class ConfigError(ValueError):
    """A config file or section that cannot be used. ``malformed``: a value of the wrong JSON type
    or shape, or a required key missing (rather than a value this build does not accept)."""

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(message)
        self.malformed = malformed


@dataclass(config=PART)
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


@dataclass(config=PART)
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


@dataclass(config=PART)
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


@dataclass(config=PART)
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


# --- [model]: the architecture's own keys in [model.<arch>] ---------------------------------------


@dataclass(config=PART)
class SharedBottomConfig:
    """``[model.shared_bottom]``: shared embeddings + shared bottom MLP, one tower per task."""

    arch: Literal["shared_bottom"] = "shared_bottom"
    bottom_dims: list[int] = field(default_factory=lambda: [256, 128])


@dataclass(config=PART)
class SeparateConfig:
    """``[model.separate]``: one full network per task, nothing shared."""

    arch: Literal["separate"] = "separate"
    bottom_dims: list[int] = field(default_factory=lambda: [256, 128])


@dataclass(config=PART)
class MMoEConfig:
    """``[model.mmoe]``: ``n_experts`` expert MLPs mixed by one softmax gate per task."""

    arch: Literal["mmoe"] = "mmoe"
    n_experts: int = 4
    expert_dims: list[int] = field(default_factory=lambda: [128, 64])
    gate_dropout: float = 0.0  # drop whole experts from a gate while training (Zhao et al.)

    def __post_init__(self) -> None:
        if self.n_experts < 1 or not 0.0 <= self.gate_dropout < 1.0:
            raise ConfigError("model.mmoe: n_experts must be >= 1 and gate_dropout in [0, 1)")


@dataclass(config=PART)
class PLEConfig:
    """``[model.ple]`` (Tang et al. RecSys 2020): ``levels`` of shared + per-task experts with gates."""

    arch: Literal["ple"] = "ple"
    levels: int = 2
    n_shared_experts: int = 2
    n_task_experts: int = 1
    expert_dims: list[int] = field(default_factory=lambda: [128, 64])  # every level
    gate_dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.levels, self.n_shared_experts, self.n_task_experts) < 1:
            raise ConfigError("model.ple: levels, n_shared_experts and n_task_experts must be >= 1")
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ConfigError("model.ple: gate_dropout must be in [0, 1)")


@dataclass(config=PART)
class ConditionedConfig:
    """``[model.conditioned]``: one trunk (``bottom_dims``) + one head shared by all tasks, told the
    task by a learned task embedding z_t: concatenated to the input, added to the input, or FiLM on
    every trunk layer."""

    arch: Literal["conditioned"] = "conditioned"
    bottom_dims: list[int] = field(default_factory=lambda: [256, 128])
    conditioning: Conditioning = "concat"
    task_embed_dim: int = 16  # concat / film ("add" uses the input width)

    def __post_init__(self) -> None:
        if not self.bottom_dims:
            raise ConfigError("model.conditioned: bottom_dims (its shared trunk) must not be empty")


NetConfig = Annotated[
    SharedBottomConfig | SeparateConfig | MMoEConfig | PLEConfig | ConditionedConfig,
    Field(discriminator="arch"),
]


@dataclass(config=PART)
class ModelConfig:
    """The network: ``net`` is the architecture and its own keys (``[model.<arch>]``); the rest is
    common to every architecture."""

    net: NetConfig = field(default_factory=MMoEConfig)
    embed_dim: int = 16
    tower_dims: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.1
    # position / selection bias (Zhao et al. RecSys 2019): a shallow tower on these categorical log
    # columns (never served) whose logit is added to the bias_tasks' logits in training only
    bias_features: list[str] = field(default_factory=list)
    bias_tasks: list[str] = field(default_factory=list)  # empty: the first task
    bias_dims: list[int] = field(default_factory=lambda: [16])
    bias_dropout: float = 0.1  # fraction of training rows whose bias features are set to "unknown"

    def __post_init__(self) -> None:
        if not 0.0 <= self.bias_dropout < 1.0:
            raise ConfigError("model.bias_dropout must be in [0, 1)")
        if len(set(self.bias_features)) != len(self.bias_features):
            raise ConfigError(f"model.bias_features has duplicates: {self.bias_features!r}")

    @property
    def arch(self) -> str:
        return self.net.arch

    def net_args(self) -> dict[str, Any]:
        """The architecture's own keys as keyword arguments of its network (``model.nets``)."""
        return {k: v for k, v in asdict(self.net).items() if k != "arch"}


# --- [train.weighting]: a scheme's own keys in [train.weighting.<kind>] ----------------------------


@dataclass(config=PART)
class PlainWeighting:
    """A task weighting without keys of its own (``train.weighting = "mgda"``)."""

    kind: Literal["static", "uncertainty", "mgda", "pcgrad"] = "static"


@dataclass(config=PART)
class WorstCaseConfig:
    """``[train.weighting.worst_case]``: minimise a smooth max of L_i / R_i."""

    kind: Literal["worst_case"] = "worst_case"
    temperature: float = 0.1  # smooth max (log-sum-exp); 0 = hard max
    # R_i: "constant" = the best constant predictor's loss on the training labels; "initial" = L_i(0)
    reference: LossReference = "constant"

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError("train.weighting.worst_case: temperature must be >= 0")


@dataclass(config=PART)
class GradNormConfig:
    """``[train.weighting.gradnorm]`` (Chen et al. 2018)."""

    kind: Literal["gradnorm"] = "gradnorm"
    alpha: float = 1.5  # asymmetry
    lr: float = 0.01  # Adam learning rate of the task weights
    # r_i = L_i / R_i, the same two choices as worst_case ("initial" = the paper's L_i(0))
    reference: LossReference = "constant"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError("train.weighting.gradnorm: lr must be > 0")


WeightingConfig = Annotated[PlainWeighting | WorstCaseConfig | GradNormConfig, Field(discriminator="kind")]


@dataclass(config=PART)
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
    # task weighting (model.weighting): "static" uses tasks[].weight; [train.weighting.<kind>]
    weighting: WeightingConfig = field(default_factory=PlainWeighting)
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


@dataclass(config=PART)
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


Fit = Literal["auto", "product", "sum", "off"]
FITS: tuple[str, ...] = ("auto", "product", "sum", "off")


@dataclass(config=PART)
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


@dataclass(config=PART)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "mtrank"
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        """The rules that span fields (each part checks its own on construction)."""
        if not self.tasks:
            raise ConfigError("a config needs at least one [[tasks]] entry")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}")
        for t in self.tasks:
            if t.weight < 0:
                raise ConfigError(f"task {t.name!r}: weight must be >= 0")
        m, tr = self.model, self.train
        if m.bias_features and set(m.bias_tasks) - set(names):
            raise ConfigError(f"model.bias_tasks must name configured tasks, got {m.bias_tasks!r}")
        for key, least in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("patience", 0)):
            if getattr(tr, key) < least:
                raise ConfigError(f"train.{key} must be >= {least}, got {getattr(tr, key)}")
        if not tr.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {tr.lr}")
        if tr.log_every < 0:
            raise ConfigError(f"train.log_every must be >= 0 (0 = no step log), got {tr.log_every}")
        if tr.tower_l2 < 0:
            raise ConfigError("train.tower_l2 must be >= 0")
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
            if tr.weighting.kind == "pcgrad":
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
        """The config as a TOML file writes it (``from_dict`` reads it back)."""
        d = asdict(self)
        net = d["model"].pop("net")
        arch = net.pop("arch")
        d["model"] = {"arch": arch, **d["model"], arch: net}
        weighting = d["train"]["weighting"]
        kind = weighting.pop("kind")
        d["train"]["weighting"] = {kind: weighting} if weighting else kind
        return d

    def validated(self) -> Config:
        """This config checked again (after its fields were assigned to)."""
        return Config.from_dict(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, legacy: bool = False) -> Config:
        """A config from its TOML / JSON form. ``legacy``: also read the flat ``[model]`` and
        ``[train]`` keys of older checkpoints (elsewhere they are errors that name their table)."""
        d = dict(d)
        d.setdefault("name", "mtrank")
        if isinstance(d.get("model"), Mapping):
            d["model"] = _nest_model(dict(d["model"]), legacy)
        if isinstance(d.get("train"), Mapping):
            d["train"] = _nest_weighting(dict(d["train"]), legacy)
        try:
            text = json.dumps(d)
        except (TypeError, ValueError) as e:  # a TOML date, say
            raise ConfigError(f"config: {e}", malformed=True) from e
        try:
            return _CONFIG.validate_json(text, strict=True)
        except ValidationError as e:
            raise _config_error(e) from None


# Keys that moved from flat [model] / [train] to their part's table: old name -> (part, new name)
_FLAT_MODEL: dict[str, tuple[tuple[str, ...], str]] = {
    "bottom_dims": (("shared_bottom", "separate", "conditioned"), "bottom_dims"),
    "n_experts": (("mmoe",), "n_experts"),
    "expert_dims": (("mmoe", "ple"), "expert_dims"),
    "gate_dropout": (("mmoe", "ple"), "gate_dropout"),
    "ple_levels": (("ple",), "levels"),
    "n_shared_experts": (("ple",), "n_shared_experts"),
    "n_task_experts": (("ple",), "n_task_experts"),
    "conditioning": (("conditioned",), "conditioning"),
    "task_embed_dim": (("conditioned",), "task_embed_dim"),
}
_FLAT_TRAIN: dict[str, tuple[tuple[str, ...], str]] = {
    "worst_case_temperature": (("worst_case",), "temperature"),
    "worst_case_reference": (("worst_case",), "reference"),
    "gradnorm_alpha": (("gradnorm",), "alpha"),
    "gradnorm_lr": (("gradnorm",), "lr"),
    "gradnorm_reference": (("gradnorm",), "reference"),
}


def _tagged(
    section: str,
    tag_key: str,
    disc: str,
    default: str,
    tags: tuple[str, ...],
    values: dict[str, Any],
    flat: dict[str, tuple[tuple[str, ...], str]],
    legacy: bool,
) -> dict[str, Any]:
    """One part of a section as the discriminated union reads it ({disc: tag, **its keys}) from the
    TOML form: ``tag_key = "tag"`` and/or a ``[section.tag]`` table (``[section.tag_key.tag]``),
    or the flat legacy keys ``flat`` (old name -> (the parts that own it, new name))."""
    table = values.pop(tag_key, None)
    if isinstance(table, Mapping):  # [train.weighting.<kind>]: the key is the table
        if len(table) != 1:
            raise ConfigError(
                f"[{section}.{tag_key}] takes one table, [{section}.{tag_key}.<kind>], got {sorted(table)}"
            )
        ((tag, part),) = table.items()
    else:
        tag, part = table, None
    tables = [k for k in tags if k in values]
    if len(tables) > 1:
        raise ConfigError(
            f"[{section}]: one of the tables {['.'.join((section, t)) for t in tables]}, not several"
        )
    if tables:
        if tag is not None and tag != tables[0]:
            raise ConfigError(f"[{section}] {tag_key} = {tag!r} but the table is [{section}.{tables[0]}]")
        tag, part = tables[0], values.pop(tables[0])
    tag = tag if tag is not None else default
    if part is not None and not isinstance(part, Mapping):
        raise ConfigError(f"[{section}] {tag}: expected a table, got {part!r}"[:200], malformed=True)
    out = {disc: tag, **(part or {})}
    mixed = [old for old in flat if old in values]
    if legacy and part is not None and mixed:  # no build wrote both forms
        table = f"{section}.weighting.{tag}" if section == "train" else f"{section}.{tag}"
        raise ConfigError(f"[{section}]: flat keys {mixed} beside the [{table}] table")
    for old, (owners, new) in flat.items():
        if old not in values:
            continue
        value = values.pop(old)
        if not legacy:
            raise _moved(section, old, tag)
        if tag in owners:  # an old checkpoint stored every key; the other parts' were unused
            out.setdefault(new, value)
    return out


def _moved(section: str, old: str, tag: str) -> ConfigError:
    """The error for a flat ``[section]`` key that moved to a part's table (``tag``: the part in
    force, which names the table when the key belongs to several)."""
    owners, new = (_FLAT_MODEL if section == "model" else _FLAT_TRAIN)[old]
    owner = tag if tag in owners else owners[0]
    where = f"[model.{owner}] {new}" if section == "model" else f"[train.weighting.{owner}] {new}"
    return ConfigError(f"[{section}] {old} is now {where}")


def _nest_model(m: dict[str, Any], legacy: bool) -> dict[str, Any]:
    if "net" in m:  # the dataclass form
        return m
    return {"net": _tagged("model", "arch", "arch", "mmoe", ARCHS, m, _FLAT_MODEL, legacy), **m}


def _nest_weighting(t: dict[str, Any], legacy: bool) -> dict[str, Any]:
    if isinstance(t.get("weighting"), Mapping) and "kind" in t["weighting"]:  # the dataclass form
        return t
    kinds = tuple(k for k in WEIGHTINGS if k in t)
    if kinds:  # a [train.<kind>] table: not where weightings live
        raise ConfigError(f"[train.{kinds[0]}] is [train.weighting.{kinds[0]}]")
    flat = {k: v for k, v in t.items() if k in _FLAT_TRAIN}
    rest = {k: v for k, v in t.items() if k not in _FLAT_TRAIN}
    values = {"weighting": rest.pop("weighting", None), **flat}
    part = _tagged("train", "weighting", "kind", "static", (), values, _FLAT_TRAIN, legacy)
    return {**rest, "weighting": part}


_CONFIG: TypeAdapter[Config] = TypeAdapter(Config)
_NET: TypeAdapter[NetConfig] = TypeAdapter(NetConfig)
_WEIGHTING: TypeAdapter[WeightingConfig] = TypeAdapter(WeightingConfig)

# pydantic error types that say a value has the wrong JSON type or shape (a corrupt file), rather
# than a value or key this build does not accept
_SHAPE_ERRORS = ("_type", "missing", "too_short", "too_long", "union_tag_not_found")
_KINDS = {
    "int": "integer",
    "float": "number",
    "string": "string",
    "bool": "boolean",
    "list": "list",
    "tuple": "list",
    "dict": "object",
    "dataclass": "object",
    "model": "object",
}
_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "tuple"}
_JSON_NAMES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}


def _where(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as config keys: model.mmoe.n_experts, tasks[0].name."""
    out = ""
    for i, part in enumerate(loc):
        if part == "net" and i > 0 and loc[i - 1] == "model":  # [model.<arch>]: the tag follows
            continue
        if isinstance(part, str) and ("[" in part or part in _MEMBERS):
            continue  # a union member's name (str | list[str]), not a key
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def describe_error(err: Any, prefix: str = "") -> str:
    """One pydantic error (of a JSON document validated against dataclasses) as a short line:
    ``model.dropout: expected number, got string 'a'``, ``tasks[0]: missing key 'name'``."""
    where = prefix + _where(tuple(err["loc"]))
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    section, _, key = where.rpartition(".")
    if kind == "value_error" and isinstance(ctx.get("error"), ValueError):
        return str(ctx["error"])
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"[{section or 'config'}] unknown keys: [{key!r}]"
    if kind in ("missing", "missing_argument"):
        return f"{section or prefix.rstrip('.') or 'config'}: missing key {key!r}"
    if kind in ("too_short", "too_long") and "actual_length" in ctx:
        want = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
        return f"{where}: expected a list of {want} items, got {ctx['actual_length']}"
    if kind.endswith("_type") and kind.removesuffix("_type") in _KINDS:
        shown = _JSON_NAMES.get(type(got), "null" if got is None else type(got).__name__)
        if not isinstance(got, dict | list):
            r = repr(got)
            shown += f" {r if len(r) <= 40 else r[:37] + '...'}"
        return f"{where}: expected {_KINDS[kind.removesuffix('_type')]}, got {shown}"
    shown = "" if isinstance(got, dict | list) else f", got {got!r}"[:60]
    return f"{where}: {err['msg']}{shown}"


def is_malformed(err: Any) -> bool:
    """The error says a value has the wrong JSON type or shape, or a key is missing."""
    return any(s in err["type"] for s in _SHAPE_ERRORS)


def _config_error(e: ValidationError) -> ConfigError:
    errors = e.errors(include_url=False)
    message = "; ".join(describe_error(err) for err in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ConfigError(message + more, malformed=any(is_malformed(err) for err in errors))


def apply_overrides(cfg: Config, assignments: list[str]) -> Config:
    """``section.key=value`` assignments (``train.lr=0.01``, ``data.log="logs/*.parquet"``,
    ``model.mmoe.expert_dims=[64, 32]``) applied to a config, re-validated. A value is read as TOML,
    and as a plain string when it is not TOML. Another architecture or weighting's key
    (``model.ple.levels=3``, ``train.weighting.gradnorm.alpha=2``) switches to it, and
    ``model.arch=ple`` / ``train.weighting=gradnorm`` switch with that part's defaults."""
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
        model, train = d["model"], d["train"]
        if path[:1] == ["model"] and path[1:] and path[1] in _FLAT_MODEL:
            raise _moved("model", path[1], model["arch"])
        if path[:1] == ["train"] and path[1:] and path[1] in _FLAT_TRAIN:
            raise _moved("train", path[1], weighting_name(train))
        if path == ["train", "weighting"] and value == weighting_name(train):
            continue  # the weighting it already has, with its keys
        if path == ["model", "arch"] and value != model["arch"]:
            model.pop(model["arch"], None)
        elif len(path) == 3 and path[:2] == ["model", path[1]] and path[1] in ARCHS and path[1] not in model:
            model.pop(model["arch"], None)
            model.update(arch=path[1], **{path[1]: _part_defaults("model", path[1])})
        elif len(path) == 4 and path[:2] == ["train", "weighting"] and path[2] in WEIGHTINGS:
            w = train["weighting"]
            if not (isinstance(w, dict) and path[2] in w):
                train["weighting"] = {path[2]: _part_defaults("train", path[2])}
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


def weighting_name(train: Mapping[str, Any]) -> str:
    """The task weighting a stored ``[train]`` table names, in any of its forms: ``"mgda"``,
    ``{"gradnorm": {...}}`` (TOML), ``{"kind": "gradnorm", ...}`` (dataclass)."""
    w = train.get("weighting", "static")
    if isinstance(w, Mapping):
        return str(w.get("kind") or next(iter(w), "static"))
    return str(w)


def _part_defaults(section: str, tag: str) -> dict[str, Any]:
    """The keys of one architecture (``model``) or weighting (``train``) with their defaults."""
    adapter, disc = (_NET, "arch") if section == "model" else (_WEIGHTING, "kind")
    part = asdict(adapter.validate_json(json.dumps({disc: tag})))
    return {k: v for k, v in part.items() if k != disc}


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
