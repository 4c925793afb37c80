"""After training: each binary head's calibration, and the served head combination fitted on the
validation split -- the checkpoint manifest's ``ranking`` entry.

1. **Calibration.** Each binary head's reliability on the validation rows (equal-count bins, ECE,
   log loss), and a held-out check of Platt scaling, a base-rate shift and isotonic regression
   (fitted on the earlier half of the rows by time, judged on the later half). A Platt scaling
   whose held-out log loss is lower (95% bootstrap interval of the per-row difference below 0)
   is refitted on all validation rows and folded into the head's output layer, so the checkpoint,
   offline evaluation and the service all score the calibrated head; the test metrics are then
   recomputed (``objective.calibrate = false``: measure only).
2. **Combination.** The validation rows scored as served (unknown rows imputed, calibrated, label
   space) and ``model.objective.fit_combination``: the weights and method maximising the
   ``[objective]``'s NDCG@k over its lists. The service combines the heads this way unless its
   settings or a request say otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from model.config import Config
from model.data.loader import AnySplit
from model.nets import MultiTaskNet
from model.objective import (
    METHODS,
    Combination,
    Lists,
    Method,
    bootstrap_ci,
    calibration_check,
    default_gain,
    describe,
    fit_combination,
    reliability,
)
from model.replica import Replica
from model.scoring import combine_scores, head_outputs

if TYPE_CHECKING:
    from model.data.loader import Dataset
    from model.train import TrainResult

log = logging.getLogger(__name__)


@dataclass
class ScoredRows:
    """A split's rows scored as served, in order: per-head scores, labels (N, T), the objective's
    gains and list ids (rows without them: the default gain and the group ids), log fragments and
    times (None: the rows have none)."""

    heads: dict[str, np.ndarray]
    labels: np.ndarray
    gain: np.ndarray
    lists: np.ndarray
    fragments: np.ndarray
    times: np.ndarray | None


@torch.inference_mode()
def score_split(model: MultiTaskNet, split: AnySplit, cfg: Config, batch_size: int = 8192) -> ScoredRows:
    model.eval()
    device = next(model.parameters()).device
    heads: dict[str, list[np.ndarray]] = {t.name: [] for t in cfg.tasks}
    labels, gains, lists, frags, times = [], [], [], [], []
    for part in split.parts():
        for i in range(0, len(part), batch_size):
            b = part.take(slice(i, i + batch_size))
            raw = model(
                torch.from_numpy(np.asarray(b.cats, dtype=np.int64)).to(device),
                torch.from_numpy(b.nums).to(device),
            )
            for k, v in head_outputs(raw, cfg.tasks).items():
                heads[k].append(v)
        labels.append(part.labels)
        gains.append(part.gain if part.gain is not None else default_gain(part.labels, cfg.tasks))
        lists.append(part.lists if part.lists is not None else part.users)
        frags.append(part.fragments if part.fragments is not None else np.zeros(len(part), np.int32))
        times.append(part.times)
    if not labels:
        z = np.zeros(0)
        return ScoredRows({t.name: z for t in cfg.tasks}, np.zeros((0, len(cfg.tasks))), z, z, z, None)
    return ScoredRows(
        {k: np.concatenate(v) for k, v in heads.items()},
        np.concatenate(labels),
        np.concatenate(gains),
        np.concatenate(lists),
        np.concatenate(frags),
        None if any(t is None for t in times) else np.concatenate(times),  # type: ignore[arg-type]
    )


def methods_for(cfg: Config) -> tuple[Method, ...]:
    """The combinations ``objective.fit`` allows: a product of powers needs probabilities."""
    binary = all(t.kind == "binary" for t in cfg.tasks)
    if cfg.objective.fit == "auto":
        return METHODS if binary else ("sum",)
    if cfg.objective.fit in METHODS:
        return (cfg.objective.fit,)
    return ()


def _gather(rows: ScoredRows, cfg: Config, replica: Replica | None) -> ScoredRows | None:
    """Every rank's scored rows on rank 0, in the order one process reads them (None elsewhere)."""
    if replica is None or not replica.distributed:
        return rows
    gathered = replica.gather_to_root(rows)
    if gathered is None:
        return None
    order = np.argsort(np.concatenate([g.fragments for g in gathered]), kind="stable")
    labels = [g.labels for g in gathered if len(g.labels)]
    return ScoredRows(
        {t.name: np.concatenate([g.heads[t.name] for g in gathered])[order] for t in cfg.tasks},
        np.concatenate(labels)[order] if labels else rows.labels,
        np.concatenate([g.gain for g in gathered])[order],
        np.concatenate([g.lists for g in gathered])[order],
        np.concatenate([g.fragments for g in gathered])[order],
        None
        if any(g.times is None for g in gathered)
        else np.concatenate([g.times for g in gathered])[order],
    )


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    out: np.ndarray = np.log(p / (1 - p))
    return out


def _row_logloss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    out: np.ndarray = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return out


def check_calibration(cfg: Config, rows: ScoredRows) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    """Each binary head's calibration on the validation rows, and the Platt scalings worth
    applying: those that lower the held-out log loss (later half by time; 95% bootstrap interval of
    the per-row difference below 0), refitted on every validation row. Returns (report, {head: (a, b)})."""
    heads, labels, times = rows.heads, rows.labels, rows.times
    if times is not None and len(times) and np.nanmin(times) < np.nanmax(times):
        fit_on = times <= np.nanmedian(times)  # forward in time: the earlier half calibrates the later
        how = "fitted on the earlier half of the validation rows by time, judged on the later half"
    else:
        fit_on = np.mod(rows.lists, 2) == 0
        how = "fitted on half of the validation lists, judged on the other half"
    report: dict[str, Any] = {}
    apply: dict[str, tuple[float, float]] = {}
    for t, task in enumerate(cfg.tasks):
        if task.kind != "binary" or not len(labels):
            continue
        seen = ~np.isnan(labels[:, t])
        y, p, f = labels[seen, t], heads[task.name][seen], fit_on[seen]
        if len(y) < 2 or len(np.unique(y)) < 2:
            continue
        entry = calibration_check(y, p, f, ~f)
        held = entry.get("held_out")
        if held is not None:
            a, b = held["platt_params"]["a"], held["platt_params"]["b"]
            q = 1 / (1 + np.exp(-(a * _logit(p[~f]) + b)))
            diff = _row_logloss(y[~f], q) - _row_logloss(y[~f], p[~f])
            low, high = bootstrap_ci(diff, resamples=1000, seed=0)
            held["platt_logloss_change"] = {"mean": float(diff.mean()), "low": low, "high": high}
            if high < 0:
                from sklearn.linear_model import LogisticRegression

                lr = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p).reshape(-1, 1), y)
                apply[task.name] = (float(lr.coef_[0, 0]), float(lr.intercept_[0]))
        report[task.name] = entry
    if report:
        report["held_out_check"] = how
    return report, apply


def fold_platt(model: MultiTaskNet, task: str, a: float, b: float) -> bool:
    """Make a binary head serve sigmoid(a * logit + b): folded into its tower's output layer, so
    the checkpoint, offline evaluation and the service all score the calibrated head. False when
    the head has no output layer of its own (the conditioned arch shares one)."""
    towers = getattr(model, "towers", None)
    if not isinstance(towers, nn.ModuleDict) or task not in towers:
        return False
    out = getattr(towers[task], "out", None)
    if not isinstance(out, nn.Linear):
        return False
    c = 0.0  # the bias tower's logit at unknown features, added after the tower when served
    bias = model.bias_tower
    if bias is not None and task in bias.tasks:
        was = bias.training
        bias.eval()
        with torch.no_grad():
            unknown = torch.zeros(1, bias.n_features, dtype=torch.long, device=out.weight.device)
            c = float(bias(unknown, dropout=False)[0, bias.tasks.index(task)])
        bias.train(was)
    with torch.no_grad():
        out.weight.mul_(a)
        out.bias.mul_(a).add_((a - 1.0) * c + b)
    return True


def fit_ranking(cfg: Config, result: TrainResult, ds: Dataset, *, replica: Replica | None = None) -> None:
    """After training (``model.train.train``): measure each binary head's calibration on the
    validation split and apply a Platt scaling where it helps on held-out validation rows (test
    metrics refreshed), then fit the served combination. Sets ``result.ranking`` (the manifest's
    ``ranking`` entry) on rank 0."""
    model = result.model
    batch = cfg.train.eval_batch_size
    rows = _gather(score_split(model, ds.valid, cfg, batch), cfg, replica)
    calibration: dict[str, Any] = {}
    apply: dict[str, tuple[float, float]] = {}
    if rows is not None and cfg.objective.calibrate:
        calibration, apply = check_calibration(cfg, rows)
    if replica is not None and replica.distributed:
        apply = replica.broadcast(apply)
    applied = {t: ab for t, ab in apply.items() if fold_platt(model, t, *ab)}
    if applied:
        from model.train import evaluate_split

        before = {k: v for k, v in result.metrics.items() if k.startswith("test/")}
        rows = _gather(score_split(model, ds.valid, cfg, batch), cfg, replica)
        after = evaluate_split(model, ds.test, cfg.tasks, "test/", batch, replica=replica, grouped=ds.grouped)
        result.metrics.update(after)
        if rows is not None:
            for t, (a, b) in applied.items():
                i = [task.name for task in cfg.tasks].index(t)
                seen = ~np.isnan(rows.labels[:, i])
                fitted = reliability(rows.labels[seen, i], rows.heads[t][seen])
                # in-sample: the scaling was fitted on these rows
                calibration[t]["applied"] = {"method": "platt", "a": a, "b": b, "calibrated": fitted}
            calibration["test_before_calibration"] = before
            log.info("calibrated heads (Platt, folded into the output layers): %s", applied)
    if rows is None:
        return
    out: dict[str, Any] = {"objective": describe(cfg)}
    out.update(choose_combination(cfg, rows))
    if calibration:
        out["calibration"] = calibration
    result.ranking = out if len(out) > 1 else None


def choose_combination(cfg: Config, rows: ScoredRows) -> dict[str, Any]:
    """The served combination for the validation lists, with its NDCG (empty: nothing to fit).

    The searched weights are served only when they beat the best simple combination -- one head
    alone, or every weight 1 -- on the validation lists by more than the lists' noise (the 95%
    bootstrap interval of the per-list NDCG difference above 0); otherwise that simple one is
    (a one-standard-error rule: a few hundred lists cannot tell weights apart more finely)."""
    obj, k = cfg.objective, cfg.objective.k
    ls = Lists(rows.lists, rows.gain, k=k, min_size=obj.min_list_size)
    methods = methods_for(cfg)
    if not methods:
        return {}
    if not ls.n_lists:
        log.warning(
            "no validation lists to fit the served combination on (objective.group_by / min_list_size)"
        )
        return {}
    default_method: Method = "product" if all(t.kind == "binary" for t in cfg.tasks) else "sum"
    fit = fit_combination(rows.heads, ls, methods, default_method=default_method)
    names = list(rows.heads)
    simple = {"every weight 1": Combination(default_method, dict.fromkeys(names, 1.0))}
    simple.update(
        {f"{h} alone": Combination(default_method, {n: float(n == h) for n in names}) for h in names}
    )

    def per_list(c: Combination) -> np.ndarray:
        return ls.metrics(combine_scores(rows.heads, c.weights, c.method)).ndcg

    simple_ndcg = {name: per_list(c) for name, c in simple.items()}
    best_simple = max(simple_ndcg, key=lambda n: (float(simple_ndcg[n].mean()), n == "every weight 1"))
    diff = per_list(fit.combination) - simple_ndcg[best_simple]
    low, high = bootstrap_ci(diff, resamples=1000, seed=0)
    chosen, served = ("search", fit.combination) if low > 0 else (best_simple, simple[best_simple])
    value = float(per_list(served).mean())
    log.info(
        "served combination: %s %s (%s), validation NDCG@%d %.4f (searched %.4f, %s %.4f; %d lists)",
        served.method,
        {h: round(w, 4) for h, w in served.weights.items()},
        chosen,
        k,
        value,
        fit.ndcg,
        best_simple,
        float(simple_ndcg[best_simple].mean()),
        ls.n_lists,
    )
    return {
        "combination": {"method": served.method, "weights": served.weights},
        "validation": {
            "lists": ls.n_lists,
            "rows": len(ls.rows),
            f"ndcg@{k}": value,
            "chosen": chosen,
            f"default_ndcg@{k}": fit.default,
            f"heads_ndcg@{k}": fit.heads,
            "search": {
                "method": fit.combination.method,
                "weights": fit.combination.weights,
                f"ndcg@{k}": fit.ndcg,
                f"methods_ndcg@{k}": fit.by_method,
                f"minus_{best_simple.replace(' ', '_')}": {
                    "mean": float(diff.mean()),
                    "low": low,
                    "high": high,
                },
            },
        },
    }
