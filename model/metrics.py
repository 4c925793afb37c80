"""Offline ranking metrics: AUC, GAUC, logloss, RMSE/MAE and per-user NDCG@k; paired run ratios.

Global metrics come from scikit-learn. The per-user ones (GAUC, NDCG) are computed for tens of
thousands of users at once with grouped, vectorised numpy/pandas instead of a Python loop over
``sklearn`` calls; tests check them against scikit-learn user by user.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import bootstrap
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from model.config import TaskConfig


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def gauc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC, skipping users with a single class.

    Per user: AUC = (sum of the positives' ranks - P(P+1)/2) / (P*N), ranks averaged over ties
    (the Mann-Whitney U statistic, which equals ROC AUC).
    """
    df = pd.DataFrame({"g": groups, "y": (y > 0.5).astype(np.int64), "p": p})
    df["r"] = df.groupby("g")["p"].rank(method="average")
    agg = (
        df.assign(rp=df["r"] * df["y"]).groupby("g").agg(n=("y", "size"), pos=("y", "sum"), rp=("rp", "sum"))
    )
    agg = agg[(agg["pos"] > 0) & (agg["pos"] < agg["n"])]
    if agg.empty:
        return float("nan")
    neg = agg["n"] - agg["pos"]
    per_user = (agg["rp"] - agg["pos"] * (agg["pos"] + 1) / 2) / (agg["pos"] * neg)
    return float(np.average(per_user, weights=agg["n"]))


def ndcg_at_k(gain: np.ndarray, score: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over users with at least one positive gain (log2 discount, linear gain)."""
    df = pd.DataFrame({"g": groups, "gain": gain.astype(np.float64), "s": score})
    disc = 1.0 / np.log2(np.arange(k) + 2.0)

    def dcg(order_col: str) -> pd.Series:
        d = df.sort_values(["g", order_col], ascending=[True, False], kind="stable")
        pos = d.groupby("g").cumcount().to_numpy()
        keep = pos < k
        contrib = d["gain"].to_numpy()[keep] * disc[pos[keep]]
        return pd.Series(contrib).groupby(d["g"].to_numpy()[keep]).sum()

    # ties in the score are broken pessimistically-neutral by stable order of the input
    actual, ideal = dcg("s"), dcg("gain")
    ideal = ideal[ideal > 0]
    if ideal.empty:
        return float("nan")
    return float((actual.reindex(ideal.index).fillna(0.0) / ideal).mean())


def task_metrics(
    task: TaskConfig, y: np.ndarray, p: np.ndarray, groups: np.ndarray | None
) -> dict[str, float]:
    """Metrics of one head on the rows where its label is observed. ``p`` is in label space.
    GAUC needs list groups (None: the rows have none, e.g. a table without user ids)."""
    m = ~np.isnan(y)
    y, p = y[m], p[m]
    if y.size == 0:
        return {}
    if task.kind == "binary":
        out = {"auc": auc(y, p)}
        if groups is not None:
            out["gauc"] = gauc(y, p, groups[m])
        out["logloss"] = float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))
        out["positive_rate"] = float(y.mean())
        return out
    return {
        "rmse": float(np.sqrt(mean_squared_error(y, p))),
        "mae": float(mean_absolute_error(y, p)),
    }


# direction of each metric for early stopping / model selection
HIGHER_IS_BETTER = {
    "auc": True,
    "gauc": True,
    "ndcg@10": True,
    "logloss": False,
    "rmse": False,
    "mae": False,
    "loss": False,
}


def higher_is_better(metric_name: str) -> bool:
    leaf = metric_name.rsplit("/", 1)[-1]
    if leaf not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric_name!r}; known: {sorted(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[leaf]


def relevance_gain(labels: np.ndarray, tasks: list[TaskConfig]) -> np.ndarray:
    """Graded relevance for NDCG: the sum over binary heads of their (observed) labels."""
    gain = np.zeros(labels.shape[0])
    for t, task in enumerate(tasks):
        if task.kind == "binary":
            gain += np.nan_to_num(labels[:, t], nan=0.0)
    return gain


def evaluate_predictions(
    tasks: list[TaskConfig],
    labels: np.ndarray,
    heads: Mapping[str, np.ndarray],
    groups: np.ndarray | None,
    combined: np.ndarray,
    prefix: str = "",
) -> dict[str, float]:
    """All metrics of a split: ``<prefix><task>/<metric>`` plus ``<prefix>ndcg@10`` of ``combined``
    (per list group: only when the rows have groups)."""
    out: dict[str, float] = {}
    for t, task in enumerate(tasks):
        y = labels[:, t]
        p = heads[task.name]
        if task.kind == "regression" and task.transform == "log1p":
            y = np.expm1(y)  # report regression errors in label units
        for k, v in task_metrics(task, y, p, groups).items():
            out[f"{prefix}{task.name}/{k}"] = v
    if groups is not None and any(t.kind == "binary" for t in tasks):
        out[f"{prefix}ndcg@10"] = ndcg_at_k(relevance_gain(labels, tasks), combined, groups, k=10)
    return out


@dataclass(frozen=True)
class PairedRatio:
    """How much larger ``after`` is than ``before`` over paired runs (same seed, one factor changed).

    ``ratio`` is the geometric mean of after/before, ``low``..``high`` its bootstrap confidence
    interval, ``frac_higher`` the share of pairs with after > before.
    """

    ratio: float
    low: float
    high: float
    frac_higher: float
    n: int


def _paired_positive(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1 or len(b) < 2:
        raise ValueError(f"need two 1-D arrays of the same length >= 2, got {b.shape} and {a.shape}")
    if (b <= 0).any() or (a <= 0).any() or not np.isfinite(np.r_[a, b]).all():
        raise ValueError("paired ratios need finite positive values")
    return b, a


def paired_ratio(
    before: np.ndarray, after: np.ndarray, *, confidence: float = 0.95, seed: int = 0
) -> PairedRatio:
    """Geometric-mean ratio of paired positive values (e.g. losses) with a BCa bootstrap interval.

    A log-ratio per pair removes what the two runs of a pair share (here the seed's target
    function, which sets how hard both are), so a small effect shows under large run-to-run spread.
    """
    b, a = _paired_positive(before, after)
    logr = np.log(a / b)
    if np.ptp(logr) < 1e-12:  # no spread: the bootstrap interval degenerates to the point
        lo = hi = float(logr[0])
    else:
        ci = bootstrap(
            (logr,), np.mean, confidence_level=confidence, method="BCa", random_state=seed
        ).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return PairedRatio(
        float(np.exp(logr.mean())), float(np.exp(lo)), float(np.exp(hi)), float((logr > 0).mean()), len(logr)
    )


def paired_mean_ratio(
    before: np.ndarray, after: np.ndarray, *, confidence: float = 0.95, seed: int = 0
) -> PairedRatio:
    """mean(after) / mean(before) over paired positive values, with a paired BCa bootstrap interval.

    The ratio of two averaged curves, as papers plot them (e.g. Ma et al. 2018 average 200 runs per
    curve). Unlike paired_ratio it is dominated by the worst runs, so a few failed runs move it.
    """
    b, a = _paired_positive(before, after)

    def stat(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(y.mean(axis=axis) / x.mean(axis=axis))

    if np.ptp(a / b) < 1e-12:  # every pair has the same ratio: so has every resample
        lo = hi = float(a[0] / b[0])
    else:
        ci = bootstrap(
            (b, a),
            stat,
            paired=True,
            vectorized=True,
            confidence_level=confidence,
            method="BCa",
            random_state=seed,
        ).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    return PairedRatio(float(a.mean() / b.mean()), lo, hi, float((a > b).mean()), len(a))
