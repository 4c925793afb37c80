"""Batch trainer: mini-batch Adam on masked, count-normalised per-task losses.

    L = sum_i w_i * L_i,   L_i = mean over the rows of the batch whose label i is observed

Labels may be missing (NaN), e.g. satisfaction only observed after a click; those rows do not
count for that head. Early stopping watches one validation metric in its right direction and keeps
the best weights. The result is written as a versioned checkpoint (``model.checkpoint``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.checkpoint import save_checkpoint
from model.config import Config, TaskConfig
from model.data import Dataset, Split, load_dataset
from model.metrics import evaluate_predictions, higher_is_better
from model.nets import MMoE, MultiTaskNet, build_model
from model.scoring import combine_scores, head_outputs

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, Mapping[str, Any]], None]


def task_losses(out: Mapping[str, Tensor], labels: Tensor, tasks: list[TaskConfig]) -> dict[str, Tensor]:
    """Per-task mean loss over observed labels. ``labels`` (B, T) with NaN = not observed."""
    losses: dict[str, Tensor] = {}
    for t, task in enumerate(tasks):
        y = labels[:, t]
        seen = ~torch.isnan(y)  # (B,)
        n = seen.sum()
        if n == 0:
            losses[task.name] = out[task.name].sum() * 0.0  # keeps the graph, contributes nothing
            continue
        pred, target = out[task.name][seen], y[seen]
        if task.kind == "binary":
            losses[task.name] = F.binary_cross_entropy_with_logits(pred, target)
        else:
            losses[task.name] = F.mse_loss(pred, target)
    return losses


def weighted_total(losses: Mapping[str, Tensor], tasks: list[TaskConfig]) -> Tensor:
    """Static task weighting: sum_i w_i * L_i."""
    return sum((t.weight * losses[t.name] for t in tasks), start=torch.zeros(()))


@torch.inference_mode()
def predict(
    model: MultiTaskNet, split: Split, tasks: list[TaskConfig], batch_size: int = 8192
) -> dict[str, np.ndarray]:
    """Per-head scores in label space for every row of a split."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    for i in range(0, len(split), batch_size):
        raw = model(
            torch.from_numpy(split.cats[i : i + batch_size]), torch.from_numpy(split.nums[i : i + batch_size])
        )
        for k, v in head_outputs(raw, tasks).items():
            parts[k].append(v)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def evaluate_split(
    model: MultiTaskNet, split: Split, tasks: list[TaskConfig], prefix: str, batch_size: int = 8192
) -> dict[str, float]:
    if len(split) == 0:
        return {}
    heads = predict(model, split, tasks, batch_size)
    weights = {t.name: 1.0 for t in tasks if t.kind == "binary"} or {t.name: 1.0 for t in tasks}
    combined = combine_scores(heads, weights, "product")
    metrics = evaluate_predictions(tasks, split.labels, heads, split.users, combined, prefix=prefix)
    with torch.inference_mode():  # the training objective on this split, for curves and early stopping
        total, n = 0.0, 0
        for i in range(0, len(split), batch_size):
            sl = slice(i, i + batch_size)
            out = model(torch.from_numpy(split.cats[sl]), torch.from_numpy(split.nums[sl]))
            loss = weighted_total(task_losses(out, torch.from_numpy(split.labels[sl]), tasks), tasks)
            b = split.labels[sl].shape[0]
            total, n = total + float(loss) * b, n + b
        metrics[f"{prefix}loss"] = total / max(n, 1)
    return metrics


@torch.no_grad()
def expert_utilization(
    model: MultiTaskNet, split: Split, max_rows: int = 20000
) -> dict[str, list[float]] | None:
    """Mean gate probability of each expert per task (MMoE); a collapsed gate puts ~1 on one expert."""
    if not isinstance(model, MMoE) or len(split) == 0:
        return None
    model.eval()
    g = model.gate_weights(torch.from_numpy(split.cats[:max_rows]), torch.from_numpy(split.nums[:max_rows]))
    mean = g.mean(dim=0)  # (T, E)
    return {t: [round(float(x), 4) for x in mean[i]] for i, t in enumerate(model.tasks)}


@dataclass
class TrainResult:
    model: MultiTaskNet
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    samples_per_sec: float = 0.0
    checkpoint: Path | None = None


def fit(cfg: Config, ds: Dataset, progress: ProgressFn | None = None) -> TrainResult:
    """Train on ``ds.train`` with early stopping on ``ds.valid``; evaluate on ``ds.test``."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    model = build_model(cfg.model, ds.schema, cfg.tasks)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    monitor = tc.monitor
    if len(ds.valid) == 0 and monitor.startswith("valid/"):
        monitor = "train/" + monitor.split("/", 1)[1]
    higher = higher_is_better(monitor)
    best, best_state, best_epoch, bad = -math.inf if higher else math.inf, None, 0, 0
    history: list[dict[str, float]] = []
    n = len(ds.train)
    steps_per_epoch = math.ceil(n / tc.batch_size)
    train_time, seen = 0.0, 0
    cats, nums, labels = (torch.from_numpy(a) for a in (ds.train.cats, ds.train.nums, ds.train.labels))
    for epoch in range(1, tc.epochs + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        t0, run_loss = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * tc.batch_size : (step + 1) * tc.batch_size]
            out = model(cats[idx], nums[idx])
            losses = task_losses(out, labels[idx], cfg.tasks)
            loss = weighted_total(losses, cfg.tasks)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            loss_value = float(loss.detach())
            run_loss += loss_value
            if progress is not None:
                progress(
                    "step", {"epoch": epoch, "step": step + 1, "steps": steps_per_epoch, "loss": loss_value}
                )
        train_time += time.perf_counter() - t0
        seen += n
        row: dict[str, float] = {"epoch": epoch, "train/loss": run_loss / steps_per_epoch}
        split = ds.valid if len(ds.valid) else ds.train
        row.update(
            evaluate_split(
                model, split, cfg.tasks, "valid/" if len(ds.valid) else "train/", tc.eval_batch_size
            )
        )
        history.append(row)
        value = row.get(monitor, float("nan"))
        improved = not math.isnan(value) and (value > best if higher else value < best)
        if improved:
            best, best_state, best_epoch, bad = value, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            bad += 1
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        if progress is not None:
            progress("epoch", row)
        if bad > tc.patience:
            log.info(
                "early stopping after epoch %d (best %s=%.4f at epoch %d)", epoch, monitor, best, best_epoch
            )
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    metrics: dict[str, Any] = {"best_epoch": best_epoch, "monitor": monitor, "best_monitor": best}
    metrics.update(evaluate_split(model, ds.test, cfg.tasks, "test/", tc.eval_batch_size))
    util = expert_utilization(model, ds.test)
    if util is not None:
        metrics["expert_utilization"] = util
    sps = seen / train_time if train_time > 0 else 0.0
    metrics["train_samples_per_sec"] = round(sps, 1)
    return TrainResult(model, metrics, history, best_epoch, sps)


def train(
    cfg: Config, artifacts: str | Path | None = None, progress: ProgressFn | None = None
) -> TrainResult:
    """Load data, fit, and (when ``artifacts`` is given) write a checkpoint and move LATEST to it."""
    t0 = time.perf_counter()
    ds = load_dataset(cfg)
    log.info("data loaded in %.1fs", time.perf_counter() - t0)
    result = fit(cfg, ds, progress)
    if artifacts is not None:
        result.checkpoint = save_checkpoint(
            artifacts,
            result.model,
            cfg,
            ds.schema,
            metrics=result.metrics,
            data_fingerprint=ds.fingerprint,
            extra={"history": result.history},
        )
        log.info("wrote %s", result.checkpoint)
    return result
