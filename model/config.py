"""Dataclass configs for data, tasks, model and training, loaded from one TOML file.

A config file has the sections ``[data]``, ``[[data.features]]``, ``[[tasks]]``, ``[model]`` and
``[train]``; see ``configs/*.toml``. Unknown keys are errors (a typo must not silently fall back to
a default).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

Arch = Literal["separate", "shared_bottom", "mmoe"]
TaskKind = Literal["binary", "regression"]

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


@dataclass
class DataConfig:
    source: Literal["kuairand", "tables"] = "kuairand"
    data_dir: str = "../shared/data/kuairand-pure"  # overridden by $MTRANK_DATA_DIR
    log: str = "log_standard_20220425_to_20220508_pure.csv.gz"
    users: str | None = "user_features_pure.csv"
    videos: str | None = "video_features_basic_pure.csv"
    user_key: str = "user_id"
    video_key: str = "video_id"
    time_column: str = "time_ms"
    split_column: str = "date"
    train_range: tuple[int, int] = (20220425, 20220430)
    test_range: tuple[int, int] = (20220501, 20220508)
    valid_fraction: float = 0.1  # the latest part of the train range, by time_column
    drop_duplicates: bool = True
    max_rows: int | None = None  # keep the first N log rows (smoke tests)
    features: list[FeatureDecl] = field(default_factory=list)

    def __post_init__(self) -> None:
        # TOML has no null: an empty string means "no such table"
        self.users = self.users or None
        self.videos = self.videos or None

    def path(self, name: str) -> Path:
        p = Path(name)
        if p.is_absolute():
            return p
        return Path(os.environ.get(DATA_DIR_ENV) or self.data_dir) / p


@dataclass
class TaskConfig:
    """One head. ``label`` is a column, or a list of columns whose logical OR is the label."""

    name: str
    kind: TaskKind = "binary"
    label: str | list[str] = "long_view"
    transform: Literal["none", "log1p"] = "none"  # regression targets only
    weight: float = 1.0  # static task weight w_i in sum_i w_i * L_i
    mask_by: str | None = None  # label observed only where this column is non-zero


@dataclass
class ModelConfig:
    arch: Arch = "mmoe"
    embed_dim: int = 16
    bottom_dims: list[int] = field(default_factory=lambda: [256, 128])  # shared_bottom / separate
    n_experts: int = 4
    expert_dims: list[int] = field(default_factory=lambda: [128, 64])  # mmoe
    tower_dims: list[int] = field(default_factory=lambda: [64])
    dropout: float = 0.1
    gate_dropout: float = 0.0  # mmoe: drop whole experts from a gate while training (Zhao et al.)


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0
    patience: int = 2
    monitor: str = "valid/engagement/auc"  # or valid/loss, valid/<task>/logloss, ...
    seed: int = 0
    num_threads: int = 0  # 0 = torch default
    eval_batch_size: int = 8192


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "mtrank"

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
        if self.model.arch not in ("separate", "shared_bottom", "mmoe"):
            raise ConfigError(f"model.arch must be separate, shared_bottom or mmoe, got {self.model.arch!r}")
        if not 0.0 <= self.data.valid_fraction < 1.0:
            raise ConfigError("data.valid_fraction must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        d = dict(d)
        data = dict(d.pop("data", {}))
        feats = [_build(FeatureDecl, f, "data.features") for f in data.pop("features", [])]
        for k in ("train_range", "test_range"):
            if k in data:
                data[k] = tuple(data[k])
        cfg = cls(
            data=_build(DataConfig, {**data, "features": feats}, "data"),
            tasks=[_build(TaskConfig, t, "tasks") for t in d.pop("tasks", [])],
            model=_build(ModelConfig, d.pop("model", {}), "model"),
            train=_build(TrainConfig, d.pop("train", {}), "train"),
            name=str(d.pop("name", "mtrank")),
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


def load_config(path: str | Path) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e
    raw.setdefault("name", p.stem)
    return Config.from_dict(raw)
