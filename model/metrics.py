"""Offline ranking metrics: AUC, GAUC, logloss, RMSE/MAE and per-list NDCG@k.

AUC, GAUC and NDCG are computed with sorts and segment sums over numpy arrays (tens of millions of
rows in a few seconds and a few bytes per row), not through DataFrames; tests check them against
scikit-learn, list by list.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from model.config import TaskConfig

_CHUNK = 1 << 20


def _run_rank_sums(values: np.ndarray, positive: np.ndarray, segment: np.ndarray | None) -> np.ndarray:
    """Per segment, the sum of the positives' 1-based ranks (averaged over ties) within the segment,
    for ``values`` sorted ascending within ``segment`` (segment ids ascending; None: one segment).
    Works on tie runs, never on an array of N ranks: (S,) float64."""
    n = len(values)
    new = np.ones(n, dtype=bool)
    new[1:] = values[1:] != values[:-1]
    if segment is not None:
        new[1:] |= segment[1:] != segment[:-1]
    run_start = np.flatnonzero(new)
    del new
    run_len = np.diff(np.r_[run_start, n])
    run_pos = np.add.reduceat(positive.astype(np.int64), run_start) if n else np.zeros(0, np.int64)
    if segment is None:
        seg_of_run, seg_start = np.zeros(len(run_start), dtype=np.int64), np.zeros(1, dtype=np.int64)
    else:
        seg_of_run = segment[run_start]
        first = np.r_[True, seg_of_run[1:] != seg_of_run[:-1]] if len(seg_of_run) else np.zeros(0, bool)
        seg_start = np.zeros(int(segment[-1]) + 1 if n else 0, dtype=np.int64)
        seg_start[seg_of_run[first]] = run_start[first]
    # mean 1-based position of each run within its segment, times the run's positives
    avg = (run_start - seg_start[seg_of_run]) + (run_len + 1) / 2.0
    return np.bincount(seg_of_run, weights=avg * run_pos, minlength=len(seg_start))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (the Mann-Whitney statistic, ties counted half); NaN when only one class is present."""
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg = np.sort(p[~pos])
    pp = p[pos]
    below = np.searchsorted(neg, pp, side="left")
    ties = np.searchsorted(neg, pp, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (n_pos * n_neg))


_PART_ROWS = 1 << 22  # per-list metrics over more rows run list bucket by list bucket


def _list_buckets(groups: np.ndarray) -> list[np.ndarray | None]:
    """Row indices of disjoint buckets of whole lists (by the list id's hash), so a per-list metric
    over tens of millions of rows works on a few million at a time; [None] = all rows at once."""
    n = len(groups)
    if n <= _PART_ROWS:
        return [None]
    k = -(-n // (_PART_ROWS // 2))
    ids = groups if groups.dtype.kind in "iu" else pd.factorize(groups)[0]
    bucket = (np.asarray(ids).astype(np.int64).view(np.uint64) % np.uint64(k)).astype(np.int32)
    return [np.flatnonzero(bucket == b) for b in range(k)]


def _gauc_terms(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per list with both classes: its AUC and its number of rows."""
    g = pd.factorize(groups)[0].astype(np.int32)
    order = np.lexsort((p, g))
    gs, ps, ys = g[order], p[order], (y[order] > 0.5)
    del order
    rp = _run_rank_sums(ps, ys, gs)
    n = np.bincount(gs, minlength=len(rp)).astype(np.float64)
    pos = np.bincount(gs, weights=ys, minlength=len(rp))
    keep = (pos > 0) & (pos < n)
    pos, n, rp = pos[keep], n[keep], rp[keep]
    return (rp - pos * (pos + 1) / 2) / (pos * (n - pos)), n


def gauc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-list AUC, skipping lists with a single class.

    Per list: AUC = (sum of the positives' ranks - P(P+1)/2) / (P*N), ranks averaged over ties
    (the Mann-Whitney U statistic, which equals ROC AUC).
    """
    aucs, weights = [], []
    for idx in _list_buckets(groups):
        a, w = _gauc_terms(y, p, groups) if idx is None else _gauc_terms(y[idx], p[idx], groups[idx])
        aucs.append(a)
        weights.append(w)
    a, w = np.concatenate(aucs), np.concatenate(weights)
    if not len(a):
        return float("nan")
    return float(np.average(a, weights=w))


def _ndcg_terms(gain: np.ndarray, score: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of every list with a positive gain."""
    g = pd.factorize(groups)[0].astype(np.int32)
    disc = 1.0 / np.log2(np.arange(k) + 2.0)

    def dcg(key: np.ndarray) -> np.ndarray:
        order = np.lexsort((-key, g))  # by list, then descending key; stable for ties
        gs = g[order]
        starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
        pos = np.arange(len(gs)) - np.repeat(starts, np.diff(np.r_[starts, len(gs)]))
        top = np.flatnonzero(pos < k)
        del starts
        size = int(g.max()) + 1 if len(g) else 0
        w = gain[order[top]].astype(np.float64) * disc[pos[top]]
        return np.bincount(gs[top], weights=w, minlength=size)

    ideal = dcg(gain)
    has = ideal > 0
    out: np.ndarray = dcg(score)[has] / ideal[has]
    return out


def ndcg_at_k(gain: np.ndarray, score: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over lists with at least one positive gain (log2 discount, linear gain); ties in
    the score keep the input order."""
    parts = []
    for idx in _list_buckets(groups):
        if idx is None:
            parts.append(_ndcg_terms(gain, score, groups, k))
        else:
            parts.append(_ndcg_terms(gain[idx], score[idx], groups[idx], k))
    values = np.concatenate(parts)
    return float(values.mean()) if len(values) else float("nan")


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities clipped to [1e-7, 1 - 1e-7], in chunks."""
    total = 0.0
    for i in range(0, len(y), _CHUNK):
        q = np.clip(p[i : i + _CHUNK].astype(np.float64), 1e-7, 1 - 1e-7)
        t = y[i : i + _CHUNK] > 0.5
        total -= float(np.where(t, np.log(q), np.log1p(-q)).sum())
    return total / len(y)


def task_metrics(
    task: TaskConfig, y: np.ndarray, p: np.ndarray, groups: np.ndarray | None
) -> dict[str, float]:
    """Metrics of one head on the rows where its label is observed. ``p`` is in label space.
    GAUC needs list groups (None: the rows have none, e.g. a table without user ids)."""
    m = ~np.isnan(y)
    if not m.all():  # (no copies when every label is observed)
        y, p, groups = y[m], p[m], None if groups is None else groups[m]
    if y.size == 0:
        return {}
    if task.kind == "binary":
        out = {"auc": auc(y, p)}
        if groups is not None:
            out["gauc"] = gauc(y, p, groups)
        out["logloss"] = log_loss(y, p)
        out["positive_rate"] = float(y.mean())
        return out
    err = y.astype(np.float64) - p
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


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
