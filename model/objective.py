"""The ranking objective (``[objective]``): a row's gain, request-like lists, and what a ranking of
them is worth -- NDCG@k, recall@k and the mean gain of the top k per list -- plus the fitted head
combination the service serves by default and a calibration check of the heads.

- **Gain**: ``sum_c w_c * value_c`` over the configured log columns (missing values count 0), e.g.
  long_view + 5 * is_like; without ``objective.gain`` the sum of the binary tasks' labels.
- **Lists**: rows sharing the ``objective.group_by`` columns (e.g. user x day x tab: the videos one
  request would have ranked). A list counts when it has at least ``min_list_size`` rows and a
  positive gain (otherwise every order is as good as any other).
- **Combination**: ``prod_i s_i ** w_i`` or ``sum_i w_i * s_i`` (``model.scoring.combine_scores``);
  ``fit_combination`` searches the weights (>= 0, the largest 1) that maximise the mean NDCG@k.

Ties in a score are broken by one fixed random order of the rows, never by their order in the log
(which would credit a policy with the logged order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from model.config import Config, ObjectiveConfig, TaskConfig

Method = Literal["product", "sum"]
METHODS: tuple[Method, ...] = ("product", "sum")


class ObjectiveError(ValueError):
    """Values the objective cannot use (e.g. a negative gain)."""


# --------------------------------------------------------------------------------------------
# gain and lists of log rows


def gain_columns(obj: ObjectiveConfig) -> list[str]:
    return list(obj.gain)


def row_gain(df: pd.DataFrame, cfg: Config, labels: np.ndarray) -> np.ndarray:
    """Gain per row (N,) float64: the objective's weighted sum of log columns, or (no
    ``objective.gain``) the sum of the binary tasks' observed labels ``labels`` (N, T)."""
    if not cfg.objective.gain:
        return default_gain(labels, cfg.tasks)
    out = np.zeros(len(df), dtype=np.float64)
    for col, w in cfg.objective.gain.items():
        x = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        x = np.nan_to_num(x, nan=0.0)
        if (x < 0).any() or not np.isfinite(x).all():
            bad = x[(x < 0) | ~np.isfinite(x)][0]
            raise ObjectiveError(
                f"objective.gain: column {col!r} holds {bad!r}; gains must be finite and >= 0"
            )
        out += float(w) * x
    return out


def default_gain(labels: np.ndarray, tasks: Sequence[TaskConfig]) -> np.ndarray:
    """The sum over binary tasks of their observed labels (what ``valid/ndcg@10`` ranks by)."""
    gain = np.zeros(labels.shape[0])
    for t, task in enumerate(tasks):
        if task.kind == "binary":
            gain += np.nan_to_num(labels[:, t], nan=0.0)
    return gain


def describe(cfg: Config) -> dict[str, Any]:
    """The objective as the manifest and reports state it."""
    obj = cfg.objective
    gain = dict(obj.gain) or {f"label of {t.name}": 1.0 for t in cfg.tasks if t.kind == "binary"}
    return {"gain": gain, "group_by": obj.lists(cfg.data), "k": obj.k, "min_list_size": obj.min_list_size}


# --------------------------------------------------------------------------------------------
# per-list metrics


@dataclass(frozen=True)
class ListMetrics:
    """Per evaluated list (L,): NDCG@k, recall@k (share of its positive-gain rows in the top k) and
    the mean gain of its top k (min(k, size) rows)."""

    ndcg: np.ndarray
    recall: np.ndarray
    top_gain: np.ndarray

    def means(self) -> dict[str, float]:
        return {name: float(getattr(self, name).mean()) if len(self.ndcg) else math.nan for name in NAMES}


NAMES = ("ndcg", "recall", "top_gain")


class Lists:
    """Rows grouped into the lists that count (``min_size`` rows or more, some positive gain), set
    up once so that a score vector is judged with one sort.

    ``ids`` (N,) list ids, ``gain`` (N,): rows of any order. ``rows`` are the input positions that
    belong to a counted list; a score vector passed in has N entries (all rows) or len(rows).
    """

    def __init__(
        self, ids: np.ndarray, gain: np.ndarray, *, k: int = 10, min_size: int = 2, seed: int = 0
    ) -> None:
        ids, gain = np.asarray(ids), np.asarray(gain, dtype=np.float64)
        if ids.shape != gain.shape or ids.ndim != 1:
            raise ValueError(f"list ids and gains must be 1-D of one length, got {ids.shape}, {gain.shape}")
        self.k, self.n_input = k, len(ids)
        uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
        positives = np.bincount(inv, weights=gain > 0, minlength=len(uniq))
        ok = (counts >= min_size) & (positives > 0)
        self.rows = np.flatnonzero(ok[inv])
        self.n_lists = int(ok.sum())
        self.ids = uniq[ok]
        index = np.cumsum(ok) - 1
        self.list_of = index[inv[self.rows]]  # (n,) 0..L-1
        self.gain = gain[self.rows]
        self.sizes = counts[ok].astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.tiebreak = np.random.default_rng(seed).permutation(len(self.rows))
        self.disc = 1.0 / np.log2(np.arange(k) + 2.0)
        self.n_pos = np.bincount(self.list_of, weights=self.gain > 0, minlength=self.n_lists)
        self.ideal = self._dcg(self.gain)[0]
        self.all_lists = len(uniq)

    def __len__(self) -> int:
        return self.n_lists

    def _own(self, score: np.ndarray) -> np.ndarray:
        score = np.asarray(score, dtype=np.float64)
        if len(score) == self.n_input and self.n_input != len(self.rows):
            return score[self.rows]
        if len(score) != len(self.rows):
            raise ValueError(f"a score per row: want {self.n_input} or {len(self.rows)}, got {len(score)}")
        return score

    def _dcg(self, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(DCG@k, hits@k, gain@k) per list of the order ``score`` gives (highest first)."""
        order = np.lexsort((self.tiebreak, -score, self.list_of))
        lists = self.list_of[order]
        pos = np.arange(len(order)) - self.starts[lists]
        top = pos < self.k
        lists, g = lists[top], self.gain[order][top]
        n = self.n_lists
        dcg = np.bincount(lists, weights=g * self.disc[pos[top]], minlength=n)
        hits = np.bincount(lists, weights=g > 0, minlength=n)
        return dcg, hits, np.bincount(lists, weights=g, minlength=n)

    def metrics(self, score: np.ndarray) -> ListMetrics:
        s = self._own(score)
        if not np.isfinite(s).all():
            raise ValueError("scores must be finite")
        dcg, hits, gain = self._dcg(s)
        return ListMetrics(dcg / self.ideal, hits / self.n_pos, gain / np.minimum(self.sizes, self.k))

    def ndcg(self, score: np.ndarray) -> float:
        s = self._own(score)
        return float((self._dcg(s)[0] / self.ideal).mean()) if self.n_lists else math.nan


# --------------------------------------------------------------------------------------------
# the fitted combination


@dataclass(frozen=True)
class Combination:
    """A served head combination: ``combine_scores(heads, weights, method)``."""

    method: Method
    weights: dict[str, float]


def combination_from_manifest(manifest: Mapping[str, Any], heads: Sequence[str]) -> Combination | None:
    """The fitted combination a checkpoint manifest records (``ranking.combination``), checked
    against the model's heads; None when there is none. ValueError when it is malformed."""
    ranking = manifest.get("ranking")
    if ranking is None:
        return None
    if not isinstance(ranking, dict):
        raise ValueError("manifest ranking: expected an object")
    c = ranking.get("combination")
    if c is None:
        return None
    if not isinstance(c, dict) or c.get("method") not in METHODS or not isinstance(c.get("weights"), dict):
        raise ValueError(
            f"manifest ranking.combination: want {{method: product|sum, weights: {{...}}}}, got {c!r}"
        )
    weights: dict[str, float] = {}
    for name, w in c["weights"].items():
        if name not in heads:
            raise ValueError(
                f"manifest ranking.combination: weight for {name!r}, not a head of {list(heads)}"
            )
        if isinstance(w, bool) or not isinstance(w, int | float) or not (0 <= w < math.inf):
            raise ValueError(f"manifest ranking.combination: weight {name!r} = {w!r} is not a number >= 0")
        weights[name] = float(w)
    if not any(w > 0 for w in weights.values()):
        raise ValueError("manifest ranking.combination: no weight > 0")
    return Combination(c["method"], weights)


def _features(
    heads: Mapping[str, np.ndarray], method: Method
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per head what the weight multiplies (product: log s, sum: s / its spread) and the factor
    that turns a weight on it back into a weight on the raw head."""
    feats, scale = {}, {}
    for name, s in heads.items():
        s = np.asarray(s, dtype=np.float64)
        if method == "product":
            feats[name], scale[name] = np.log(np.clip(s, 1e-12, None)), 1.0
        else:
            spread = float(s.std())
            spread = spread if spread > 0 else 1.0
            feats[name], scale[name] = s / spread, 1.0 / spread
    return feats, scale


def _normalised(w: Mapping[str, float]) -> dict[str, float]:
    top = max(w.values())
    return {k: float(v / top) for k, v in w.items()}


@dataclass
class Fit:
    """What ``fit_combination`` found: the best combination, its NDCG, and the NDCG of each
    method's best, of the unfitted default (every weight 1) and of each head alone."""

    combination: Combination
    ndcg: float
    by_method: dict[str, float]
    default: float
    heads: dict[str, float]
    evaluations: int


def fit_combination(
    heads: Mapping[str, np.ndarray],
    lists: Lists,
    methods: Sequence[Method] = METHODS,
    *,
    default_method: Method = "product",
    rounds: int = 4,
) -> Fit:
    """Weights (>= 0, the largest 1) and method maximising the mean NDCG@k over ``lists``.

    Coordinate search: starting from the best of "every weight 1" and "one head alone", each head's
    weight is swept over {0} and ratios 10^-3 .. 10^3 of the others' largest (then a finer sweep
    around the best ratio), keeping the middle of the best plateau (NDCG is piecewise constant in the
    weights), until a round changes nothing. ``heads`` hold one score per input row of ``lists``.
    Product combinations multiply probabilities: offered only when every score is positive.
    """
    names = list(heads)
    if not names or not lists.n_lists:
        raise ValueError("fitting a combination needs heads and at least one list that counts")
    count = 0

    def judge(feats: Mapping[str, np.ndarray], w: Mapping[str, float]) -> float:
        nonlocal count
        count += 1
        score = np.zeros(len(lists.rows))
        for name, x in w.items():
            if x:
                score += x * feats[name]
        return lists.ndcg(score)

    own = {n: lists._own(h) for n, h in heads.items()}
    alone = {n: lists.ndcg(own[n]) for n in names}
    best: tuple[float, Combination] | None = None
    by_method: dict[str, float] = {}
    for method in methods:
        feats, scale = _features(own, method)
        starts = [dict.fromkeys(names, 1.0)] + [{n: float(n == m) for n in names} for m in names]
        scored = [(judge(feats, w), w) for w in starts]
        value, w = max(scored, key=lambda t: t[0])
        for _ in range(rounds if len(names) > 1 else 0):
            changed = False
            for name in names:
                others = max((v for k, v in w.items() if k != name), default=0.0)
                if others <= 0:
                    continue
                coarse = np.concatenate([[0.0], np.logspace(-3, 3, 49)])
                v1, r1 = _sweep(judge, feats, w, name, others, coarse)
                if r1 > 0:
                    fine = r1 * np.logspace(-0.125, 0.125, 11)
                    v2, r2 = _sweep(judge, feats, w, name, others, np.concatenate([[r1], fine]))
                    v1, r1 = (v2, r2) if v2 > v1 else (v1, r1)
                if v1 > value + 1e-12:
                    value, w, changed = v1, {**w, name: r1 * others}, True
            if not changed:
                break
        by_method[method] = value
        raw = _normalised({k: v * scale[k] for k, v in w.items()})
        if best is None or value > best[0] + 1e-12:
            best = (value, Combination(method, raw))
    assert best is not None
    default_feats, _ = _features(own, default_method)
    default = judge(default_feats, dict.fromkeys(names, 1.0))
    return Fit(best[1], best[0], by_method, default, alone, count)


def _sweep(
    judge: Any,
    feats: Mapping[str, np.ndarray],
    w: Mapping[str, float],
    name: str,
    others: float,
    ratios: np.ndarray,
) -> tuple[float, float]:
    """The best NDCG over ``name``'s weight = ratio * others, and the ratio in the middle of the
    best values (ties: a plateau of equally good weights)."""
    values = np.array([judge(feats, {**w, name: float(r) * others}) for r in ratios])
    top = values.max()
    at = np.flatnonzero(values >= top - 1e-12)
    order = np.argsort(ratios[at])
    return float(top), float(ratios[at][order][len(order) // 2])


# --------------------------------------------------------------------------------------------
# calibration


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error over ``bins`` equal-count bins of the predictions (equal-width bins
    would put nearly every row of a rare label in the first one), their reliability curve and the
    log loss."""
    from sklearn.metrics import log_loss

    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    curve, ece = [], 0.0
    for idx in np.array_split(order, min(bins, len(order))):
        if not len(idx):
            continue
        mp, rate = float(p[idx].mean()), float(y[idx].mean())
        ece += len(idx) / len(y) * abs(mp - rate)
        curve.append({"mean_prediction": mp, "positive_rate": rate, "rows": len(idx)})
    return {
        "ece": ece,
        "logloss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "mean_prediction": float(p.mean()),
        "positive_rate": float(y.mean()),
        "rows": len(y),
        "reliability": curve,
    }


def calibration_check(
    y: np.ndarray, p: np.ndarray, fit_on: np.ndarray, judge_on: np.ndarray, bins: int = 15
) -> dict[str, Any]:
    """A binary head's calibration on validation rows, as served (all rows), and whether a
    calibration step would help: fitted on the ``fit_on`` rows (e.g. the earlier half by time),
    judged on the ``judge_on`` rows (the later half) against the served probabilities there --
    Platt scaling (sigmoid(a * logit + b)), a shift alone (sigmoid(logit + b): a base-rate
    correction) and isotonic regression."""
    from scipy.optimize import minimize_scalar
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    out: dict[str, Any] = {"served": reliability(y, p, bins)}
    if len(np.unique(y[fit_on])) < 2 or judge_on.sum() < 2:
        return out
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1))
    yf, zf, zj = y[fit_on], z[fit_on], z[judge_on]

    def shift_loss(b: float) -> float:
        q = np.clip(1 / (1 + np.exp(-(zf + b))), 1e-12, 1 - 1e-12)
        return float(-(yf * np.log(q) + (1 - yf) * np.log(1 - q)).mean())

    b = float(minimize_scalar(shift_loss, bounds=(-5.0, 5.0), method="bounded").x)
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(zf.reshape(-1, 1), yf)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p[fit_on], yf)
    judged = {
        "served": p[judge_on],
        "platt": lr.predict_proba(zj.reshape(-1, 1))[:, 1],
        "shift": 1 / (1 + np.exp(-(zj + b))),
        "isotonic": iso.predict(p[judge_on]),
    }
    yj = y[judge_on]
    out["held_out"] = {
        "fit_rows": int(fit_on.sum()),
        "judged_rows": int(judge_on.sum()),
        **{
            k: {m: v for m, v in reliability(yj, q, bins).items() if m != "reliability"}
            for k, q in judged.items()
        },
        "platt_params": {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])},
        "shift_b": b,
    }
    return out


# --------------------------------------------------------------------------------------------
# confidence intervals


def bootstrap_ci(
    values: np.ndarray, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-list values (resampling lists)."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or np.ptp(v) == 0:
        m = float(v.mean()) if len(v) else math.nan
        return m, m
    ci = bootstrap(
        (v,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        batch=max(1, min(resamples, 20_000_000 // len(v))),
        random_state=seed,
    ).confidence_interval
    return float(ci.low), float(ci.high)
