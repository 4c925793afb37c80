"""``mtrank tune``: k-fold cross-validated hyperparameter search with Optuna.

The train split (with its validation tail) is cut into k folds in one of two ways:

- ``cv="time"``: forward chaining in time (scikit-learn ``TimeSeriesSplit`` over the rows sorted by
  the log's time column): fold i trains on the first i+1 of k+1 time blocks and validates on the
  next one. This is the question the test split asks (the same users, later days).
- ``cv="user"``: k folds *by user* (``GroupKFold``), so a user's impressions never sit on both
  sides of a fold: how well a setting generalises to users it has not seen.

Each trial fits k models (early stopping on the held-out fold) and scores the mean of
``train.monitor`` over the folds. The test split is never touched. Feature vocabularies and
statistics are those fitted on the train split (they use no labels), but a held-out row's
categorical value that its fold's training rows never use is mapped to "unknown" (index 0), as an
id first seen after training is at test time and at serving: otherwise it would read an embedding
row no fold-training row ever reached. ``params`` restricts the
search to some of the ``SPACE`` names; the others keep the config's values. Without ``params`` the
search covers ``DEFAULT_SPACE``; ``embed_batch_l2`` (DIN's mini-batch aware embedding L2, an
alternative to ``embed_weight_decay``) is searched only when asked for by name.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
from sklearn.model_selection import GroupKFold, TimeSeriesSplit

from model.config import Config, MMoEConfig
from model.data import Dataset, Split
from model.metrics import higher_is_better
from model.train import fit

log = logging.getLogger(__name__)


CV = Literal["time", "user"]
CVS: tuple[str, ...] = ("time", "user")
# every searchable name; n_experts and gate_dropout only for MMoE
SPACE: tuple[str, ...] = (
    "lr",
    "weight_decay",
    "embed_weight_decay",
    "embed_dim",
    "dropout",
    "n_experts",
    "gate_dropout",
    "embed_batch_l2",
)
# searched when no names are given: the batch-aware L2 is an alternative regulariser, opt-in
DEFAULT_SPACE: tuple[str, ...] = tuple(n for n in SPACE if n != "embed_batch_l2")


class TuneError(ValueError):
    """A search that cannot run on this data or with these options (too few users for the folds, ...)."""


def _take(s: Split, idx: np.ndarray) -> Split:
    return Split(
        s.cats[idx],
        s.nums[idx],
        s.labels[idx],
        s.users[idx],
        None if s.bias is None else s.bias[idx],
        None if s.times is None else s.times[idx],
        seqs={k: v[idx] for k, v in s.seqs.items()},
    )


def _bias(s: Split, like: np.ndarray) -> np.ndarray:
    return s.bias if s.bias is not None else np.zeros((len(s), like.shape[1]), dtype=like.dtype)


def folds(ds: Dataset, k: int, cv: CV = "time") -> list[Dataset]:
    """k (train, valid) datasets from the train + valid rows: by user, or forward in time."""
    if cv not in CVS:
        raise TuneError(f"cv must be one of {CVS}, got {cv!r}")
    if k < 2:
        raise TuneError(f"need at least 2 folds, got {k}")
    if not isinstance(ds.train, Split) or not isinstance(ds.valid, Split):
        raise TuneError("cross-validation folds need the data in memory (load_dataset)")
    rows = len(ds.train) + len(ds.valid)
    if rows < k:
        raise TuneError(f"{k} folds need at least {k} train rows, the train split has {rows}")
    pool = Split(
        np.concatenate([ds.train.cats, ds.valid.cats]),
        np.concatenate([ds.train.nums, ds.valid.nums]),
        np.concatenate([ds.train.labels, ds.valid.labels]),
        np.concatenate([ds.train.users, ds.valid.users]),
        None if ds.train.bias is None else np.concatenate([ds.train.bias, _bias(ds.valid, ds.train.bias)]),
        None
        if ds.train.times is None or ds.valid.times is None
        else np.concatenate([ds.train.times, ds.valid.times]),
        seqs={k: np.concatenate([v, ds.valid.seqs[k]]) for k, v in ds.train.seqs.items()},
    )
    empty = _take(pool, np.zeros(0, dtype=np.int64))

    def held_out(tr: np.ndarray, va: np.ndarray) -> Split:
        valid = _take(pool, va)  # a fresh copy: the unseen values can be overwritten
        for j in range(valid.cats.shape[1]):
            seen = np.unique(pool.cats[tr, j])
            valid.cats[~np.isin(valid.cats[:, j], seen), j] = 0
        return valid

    if cv == "user":
        users = len(np.unique(pool.users))
        if users < k:
            raise TuneError(
                f"--cv user: {k} folds need at least {k} users (list groups: data.group_by, by default "
                f"the user key), the train split has {users}; use --cv time or fewer --folds"
            )
        splits = list(GroupKFold(n_splits=k).split(pool.labels, groups=pool.users))
    else:
        if pool.times is None:
            raise TuneError("--cv time needs the rows' times: the log has no data.time_column; use --cv user")
        order = np.argsort(pool.times, kind="stable")
        splits = [(order[tr], order[va]) for tr, va in TimeSeriesSplit(n_splits=k).split(order)]
    return [Dataset(ds.schema, _take(pool, tr), held_out(tr, va), empty, ds.fingerprint) for tr, va in splits]


def suggest(trial: optuna.Trial, cfg: Config, params: Collection[str] | None = None) -> Config:
    """The search space (``params``, default ``DEFAULT_SPACE``); returns a modified copy of ``cfg``."""
    names = set(DEFAULT_SPACE if params is None else params)
    c = copy.deepcopy(cfg)
    if "lr" in names:
        c.train.lr = trial.suggest_float("lr", 3e-4, 1e-2, log=True)
    if "weight_decay" in names:
        c.train.weight_decay = trial.suggest_float("weight_decay", 1e-8, 1e-4, log=True)
    if "embed_weight_decay" in names:
        c.train.embed_weight_decay = trial.suggest_float("embed_weight_decay", 1e-5, 1e-2, log=True)
    if "embed_batch_l2" in names:
        c.train.embed_batch_l2 = trial.suggest_float("embed_batch_l2", 1e-3, 3e-1, log=True)
    if "embed_dim" in names:
        c.model.embed_dim = trial.suggest_categorical("embed_dim", [8, 16, 32])
    if "dropout" in names:
        c.model.dropout = trial.suggest_float("dropout", 0.0, 0.4)
    if isinstance(c.model.net, MMoEConfig):
        if "n_experts" in names:
            c.model.net.n_experts = trial.suggest_categorical("n_experts", [2, 4, 8])
        if "gate_dropout" in names:
            c.model.net.gate_dropout = trial.suggest_float("gate_dropout", 0.0, 0.3)
    return c


@dataclass
class TuneResult:
    best_params: dict[str, Any]
    best_value: float
    monitor: str
    trials: list[dict[str, Any]]
    cv: str = "time"
    folds: int = 3


def tune(
    cfg: Config,
    ds: Dataset,
    n_trials: int = 10,
    k: int = 3,
    seed: int = 0,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    cv: CV = "time",
    params: Collection[str] | None = None,
) -> TuneResult:
    unknown = sorted(set(params or ()) - set(SPACE))
    if unknown or (params is not None and not params):
        raise TuneError(f"params must be a non-empty subset of {', '.join(SPACE)}; got {unknown or params}")
    if n_trials < 1:
        raise TuneError(f"need at least 1 trial, got {n_trials}")
    monitor = cfg.monitor
    higher = higher_is_better(monitor)
    cv_sets = folds(ds, k, cv)

    def objective(trial: optuna.Trial) -> float:
        c = suggest(trial, cfg, params)
        scores = []
        for i, fold in enumerate(cv_sets):
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
    return TuneResult(dict(study.best_params), float(study.best_value), monitor, trials, cv, k)


def save(result: TuneResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "monitor": result.monitor,
        "cv": result.cv,
        "folds": result.folds,
        "best_value": result.best_value,
        "best_params": result.best_params,
        "trials": result.trials,
    }
    path.write_text(json.dumps(payload, indent=1))
