"""``mtrank tune``: k-fold cross-validated hyperparameter search with Optuna.

The train split is cut into k folds *by user* (scikit-learn ``GroupKFold``), so a user's impressions
never sit on both sides of a fold; each trial fits k models (early stopping on the held-out fold)
and scores the mean of ``train.monitor`` over the folds. The test split is never touched. Feature
vocabularies and statistics are those fitted on the whole train split (they use no labels).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from sklearn.model_selection import GroupKFold

from model.config import Config
from model.data import Dataset, Split
from model.metrics import higher_is_better
from model.train import fit

log = logging.getLogger(__name__)


def _take(s: Split, idx: np.ndarray) -> Split:
    return Split(
        s.cats[idx], s.nums[idx], s.labels[idx], s.users[idx], None if s.bias is None else s.bias[idx]
    )


def _bias(s: Split, like: np.ndarray) -> np.ndarray:
    return s.bias if s.bias is not None else np.zeros((len(s), like.shape[1]), dtype=like.dtype)


def folds(ds: Dataset, k: int) -> list[Dataset]:
    """k (train, valid) datasets from the train + valid rows, grouped by user."""
    pool = Split(
        np.concatenate([ds.train.cats, ds.valid.cats]),
        np.concatenate([ds.train.nums, ds.valid.nums]),
        np.concatenate([ds.train.labels, ds.valid.labels]),
        np.concatenate([ds.train.users, ds.valid.users]),
        None if ds.train.bias is None else np.concatenate([ds.train.bias, _bias(ds.valid, ds.train.bias)]),
    )
    empty = _take(pool, np.zeros(0, dtype=np.int64))
    out = []
    for tr, va in GroupKFold(n_splits=k).split(pool.labels, groups=pool.users):
        out.append(Dataset(ds.schema, _take(pool, tr), _take(pool, va), empty, ds.fingerprint))
    return out


def suggest(trial: optuna.Trial, cfg: Config) -> Config:
    """The search space; returns a modified copy of ``cfg``."""
    c = copy.deepcopy(cfg)
    c.train.lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
    c.train.weight_decay = trial.suggest_float("weight_decay", 1e-8, 1e-4, log=True)
    c.train.embed_weight_decay = trial.suggest_float("embed_weight_decay", 1e-5, 1e-2, log=True)
    c.model.embed_dim = trial.suggest_categorical("embed_dim", [8, 16, 32])
    c.model.dropout = trial.suggest_float("dropout", 0.0, 0.4)
    if c.model.arch == "mmoe":
        c.model.n_experts = trial.suggest_categorical("n_experts", [2, 4, 8])
        c.model.gate_dropout = trial.suggest_float("gate_dropout", 0.0, 0.3)
    return c


@dataclass
class TuneResult:
    best_params: dict[str, Any]
    best_value: float
    monitor: str
    trials: list[dict[str, Any]]


def tune(
    cfg: Config,
    ds: Dataset,
    n_trials: int = 10,
    k: int = 3,
    seed: int = 0,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> TuneResult:
    monitor = cfg.train.monitor
    higher = higher_is_better(monitor)
    cv = folds(ds, k)

    def objective(trial: optuna.Trial) -> float:
        c = suggest(trial, cfg)
        scores = []
        for i, fold in enumerate(cv):
            res = fit(c, fold)
            scores.append(float(res.metrics["best_monitor"]))
            trial.report(float(np.mean(scores)), i)
        value = float(np.mean(scores))
        if on_trial is not None:
            on_trial({"trial": trial.number, "value": value, "folds": scores, **trial.params})
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize" if higher else "minimize", sampler=optuna.samplers.TPESampler(seed=seed)
    )
    study.optimize(objective, n_trials=n_trials)
    trials = [{"trial": t.number, "value": t.value, **t.params} for t in study.trials]
    return TuneResult(dict(study.best_params), float(study.best_value), monitor, trials)


def save(result: TuneResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "monitor": result.monitor,
        "best_value": result.best_value,
        "best_params": result.best_params,
        "trials": result.trials,
    }
    path.write_text(json.dumps(payload, indent=1))
