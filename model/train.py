"""Batch trainer: mini-batch Adam on masked, count-normalised per-task losses.

    L = sum_i w_i * L_i,   L_i = mean over the rows of the batch whose label i is observed

(or another task weighting, ``train.weighting``, see ``model.weighting``). Labels may be missing
(NaN), e.g. satisfaction only observed after a click; those rows do not count for that head.
Early stopping watches one validation metric in its right direction and keeps the best weights.
The result is written as a versioned checkpoint (``model.checkpoint``).

Around the weighting scheme: ``train.tower_l2`` adds the soft-sharing penalty and
``train.embed_batch_l2`` the mini-batch aware embedding L2 (``batch_embedding_l2``); the bias tower
(``model.bias_features``) sees the logged bias features in training only -- evaluation scores rows
exactly as the service does, without them. Validation / test ``loss`` is always the static
sum_i w_i L_i, comparable across weighting schemes.

Fine-tuning (``init_from``, ``mtrank train --init-from``): the network starts from a checkpoint's
weights (every tensor whose name and shape match; the data is encoded with the checkpoint's own
feature schema, so embedding rows keep their meaning), optionally with ``train.reset_heads``,
``train.freeze`` (modules by name), ``train.lr_scale`` and ``train.layer_lr_decay``.

``python -m model.train --config X --artifacts A`` trains in one process (like ``mtrank train``);
under ``torchrun --nproc_per_node=N -m model.train ...`` with DistributedDataParallel
(``model.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import promotion
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from model.config import Config, ConfigError, TaskConfig, TrainConfig, load_config
from model.data import DataError, Dataset, Split, load_dataset
from model.features import FeatureError, FeatureSchema
from model.metrics import evaluate_predictions, higher_is_better
from model.nets import PLE, MMoE, MultiTaskNet, build_model
from model.scoring import combine_scores, head_outputs
from model.weighting import TaskWeighting, make_weighting, tower_l2_penalty

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, Mapping[str, Any]], None]


def _loss(pred: Tensor, target: Tensor, kind: str, reduction: str = "mean") -> Tensor:
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(pred, target, reduction=reduction)
    return F.mse_loss(pred, target, reduction=reduction)


def task_losses(out: Mapping[str, Tensor], labels: Tensor, tasks: list[TaskConfig]) -> dict[str, Tensor]:
    """Per-task mean loss over observed labels. ``labels`` (B, T) with NaN = not observed; a task
    with no observed label in the batch gets a graph-keeping 0 (``observed_tasks`` tells which)."""
    losses: dict[str, Tensor] = {}
    for t, task in enumerate(tasks):
        y = labels[:, t]
        seen = ~torch.isnan(y)  # (B,)
        if not bool(seen.any()):
            losses[task.name] = out[task.name].sum() * 0.0  # keeps the graph, contributes nothing
            continue
        losses[task.name] = _loss(out[task.name][seen], y[seen], task.kind)
    return losses


def observed_tasks(labels: Tensor) -> Tensor:
    """(T,) bool: the tasks with at least one observed label in ``labels`` (B, T)."""
    return (~torch.isnan(labels)).any(dim=0).cpu()


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
    # the static training objective on this split, for curves and early stopping: each task's loss
    # is its mean over the split's observed labels (whatever the batch size)
    sums, counts = np.zeros(len(tasks)), np.zeros(len(tasks))
    with torch.inference_mode():
        for i in range(0, len(split), batch_size):
            sl = slice(i, i + batch_size)
            out = model(torch.from_numpy(split.cats[sl]), torch.from_numpy(split.nums[sl]))
            y = torch.from_numpy(split.labels[sl])
            for t, task in enumerate(tasks):
                seen = ~torch.isnan(y[:, t])
                sums[t] += float(_loss(out[task.name][seen], y[seen, t], task.kind, "sum"))
                counts[t] += int(seen.sum())
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    metrics[f"{prefix}loss"] = float(sum(t.weight * m for t, m in zip(tasks, means, strict=True)))
    return metrics


@torch.no_grad()
def expert_utilization(
    model: MultiTaskNet, split: Split, max_rows: int = 20000
) -> dict[str, list[float]] | None:
    """Mean gate probability of each expert per gate; a collapsed gate puts ~1 on one expert.

    MMoE: one row per task over its E experts. PLE: one row per gate over all experts of its level
    (task 0's experts, task 1's, ..., shared experts; 0 where a gate cannot look); the last level's
    task gates are keyed by task name, earlier levels' by ``level<k>/<task>`` and ``level<k>/shared``.
    """
    if not isinstance(model, MMoE | PLE) or len(split) == 0:
        return None
    model.eval()
    cats, nums = torch.from_numpy(split.cats[:max_rows]), torch.from_numpy(split.nums[:max_rows])
    if isinstance(model, MMoE):
        mean = model.gate_weights(cats, nums).mean(dim=0)  # (T, E)
        return {t: [round(float(x), 4) for x in mean[i]] for i, t in enumerate(model.tasks)}
    levels = model.gate_weights_by_level(cats, nums)
    out: dict[str, list[float]] = {}
    for k, gates in enumerate(levels, start=1):
        for name, g in gates.items():
            key = name if k == len(levels) else f"level{k}/{name}"
            out[key] = [round(float(x), 4) for x in g.mean(dim=0)]
    return out


@dataclass
class TrainResult:
    model: MultiTaskNet
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    samples_per_sec: float = 0.0
    checkpoint: Path | None = None
    steps: list[dict[str, float]] = field(default_factory=list)  # every train.log_every steps


# --------------------------------------------------------------------------------------------
# fine-tuning helpers


def load_init_checkpoint(ref: str | Path | Checkpoint, artifacts: str | Path | None = None) -> Checkpoint:
    """A checkpoint to start from: a version folder, a version id (or ``LATEST``) under artifacts."""
    if isinstance(ref, Checkpoint):
        return ref
    if Path(ref).is_dir():
        return load_checkpoint(ref)
    version = None if str(ref) == "LATEST" else str(ref)
    return load_checkpoint(resolve_checkpoint(artifacts if artifacts is not None else "artifacts", version))


def init_from_checkpoint(model: MultiTaskNet, source: Checkpoint) -> dict[str, Any]:
    """Copy every tensor whose name and shape match from the source model; report what was not."""
    src, dst = source.model.state_dict(), model.state_dict()
    loaded = [k for k, v in dst.items() if k in src and src[k].shape == v.shape]
    if not set(loaded) & {name for name, _ in model.named_parameters()}:
        raise ConfigError(f"checkpoint {source.path} has no parameter that fits the configured network")
    model.load_state_dict({**dst, **{k: src[k] for k in loaded}})
    skipped = sorted(set(dst) - set(loaded))
    if skipped:
        log.warning(
            "init from %s: %d tensors missing or of another shape, left as initialised: %s",
            source.version,
            len(skipped),
            skipped,
        )
    return {"init_from": str(source.path), "init_loaded_tensors": len(loaded), "init_skipped": skipped}


def freeze(model: MultiTaskNet, names: Sequence[str]) -> list[str]:
    """Stop training the named modules (``embed``, ``bottom``, ``experts``, ``towers.engagement``, ...:
    a dotted prefix of parameter names). Returns the frozen parameter names."""
    params = dict(model.named_parameters())
    frozen: list[str] = []
    for prefix in names:
        hit = [n for n in params if n == prefix or n.startswith(prefix + ".")]
        if not hit:
            tops = sorted({n.split(".", 1)[0] for n in params})
            raise ConfigError(f"train.freeze: {prefix!r} matches no parameter (modules: {tops})")
        frozen += hit
    for n in frozen:
        params[n].requires_grad_(False)
    return sorted(set(frozen))


def param_groups(model: MultiTaskNet, tc: TrainConfig) -> list[dict[str, Any]]:
    """Adam parameter groups: lr * lr_scale, times layer_lr_decay ** depth below the heads; the
    embedding tables get ``embed_weight_decay`` (when set), everything else ``weight_decay``."""
    lr = tc.lr * tc.lr_scale
    depths = model.param_depths() if tc.layer_lr_decay < 1.0 else {}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(depths.get(name, 0), id(p) in tables)].append(p)
    out = []
    for (d, table), ps in sorted(groups.items()):
        decay = tc.embed_weight_decay if table and tc.embed_weight_decay is not None else tc.weight_decay
        out.append({"params": ps, "lr": lr * tc.layer_lr_decay**d, "depth": d, "weight_decay": decay})
    return out


# --------------------------------------------------------------------------------------------
# the loop


def embedding_row_counts(model: MultiTaskNet, cats: npt.NDArray[np.int64]) -> Tensor:
    """How often each row of the (shared-layout) embedding tables is used by the rows ``cats``."""
    embeds = model.feature_embeddings()
    if not embeds:
        return torch.zeros(0)
    e = embeds[0]
    rows = (torch.from_numpy(cats) + e.offsets.cpu()).flatten()  # counted on the CPU
    return torch.bincount(rows, minlength=e.emb.num_embeddings).float()


def unknown_row_fill(model: MultiTaskNet, row_counts: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """What row 0 ("unknown": a missing or unseen value, e.g. a new user or video at serving) of each
    categorical feature should hold when no training row used it: the training-count-weighted mean of
    the feature's other rows, the embedding-space twin of imputing a missing numeric with its mean.
    Left alone, such a row is never trained (weight decay takes it to 0), an input the network has
    never seen. Returns (embedding weight, rows (K,), values (K, D)) per embedding table."""
    out = []
    for e in model.feature_embeddings():
        w = e.emb.weight  # (R, D)
        starts = e.offsets.tolist()
        if not starts:  # numeric features only: no categorical rows
            continue
        ends = [*starts[1:], w.shape[0]]
        rows, values = [], []
        for a, b in zip(starts, ends, strict=True):
            n = row_counts[a + 1 : b].to(w.device)  # (V,) the feature's known values
            if row_counts[a] == 0 and n.sum() > 0:
                rows.append(a)
                values.append((n[:, None] * w[a + 1 : b].detach()).sum(0) / n.sum())  # (D,)
        if rows:
            out.append((w, torch.tensor(rows, device=w.device), torch.stack(values)))
    return out


def entity_columns(schema: FeatureSchema) -> list[tuple[slice, slice]]:
    """(categorical columns, numeric columns) of the user and of the video group in the encoded
    matrices, which are group-major (user, video, context)."""
    out, c, n = [], 0, 0
    for g in ("user", "video"):
        dc, dn = len(schema.cats(g)), len(schema.nums(g))
        out.append((slice(c, c + dc), slice(n, n + dn)))
        c, n = c + dc, n + dn
    return out


def drop_to_unknown(
    cats: Tensor, nums: Tensor, groups: Sequence[tuple[slice, slice]], p: float, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Cold-start dropout (``train.unknown_dropout``): each row's features of each group are, with
    probability p, what serving sends for an entity it does not know: unknown (0) and the mean (0)."""
    cats, nums = cats.clone(), nums.clone()
    for cs, ns in groups:
        drop = torch.rand(cats.shape[0], generator=gen) < p  # (B,)
        cats[drop, cs] = 0
        nums[drop, ns] = 0.0
    return cats, nums


@torch.no_grad()
def impute_unknown_rows(model: MultiTaskNet, row_counts: Tensor) -> int:
    """Writes ``unknown_row_fill`` into the model (done once training ends, so the checkpoint serves
    it); returns how many rows were filled."""
    filled = unknown_row_fill(model, row_counts)
    for w, rows, values in filled:
        w[rows] = values
    return sum(len(rows) for _, rows, _ in filled)


@contextlib.contextmanager
def unknown_rows_imputed(model: MultiTaskNet, row_counts: Tensor) -> Iterator[None]:
    """The model as it will be served (``impute_unknown_rows``) inside the block, as trained after."""
    filled = unknown_row_fill(model, row_counts)
    saved = [w[rows].detach().clone() for w, rows, _ in filled]
    with torch.no_grad():
        for w, rows, values in filled:
            w[rows] = values
    try:
        yield
    finally:
        with torch.no_grad():
            for (w, rows, _), old in zip(filled, saved, strict=True):
                w[rows] = old


def batch_embedding_l2(model: MultiTaskNet, cats: Tensor, row_counts: Tensor) -> Tensor:
    """Mini-batch aware regularisation (Zhou et al., KDD 2018, DIN section 4.1): the L2 norm of the
    embedding rows the batch uses, each divided by its row's count n_j in the training split, i.e.
    sum_{j in batch} ||w_j||^2 / n_j, so over an epoch each row is penalised about once, however
    often it appears, and rows a batch does not touch are left alone."""
    total = torch.zeros(())
    for e in model.feature_embeddings():
        rows = torch.unique(cats + e.offsets)  # (R,)
        w = e.emb.weight[rows]  # (R, D)
        total = total + (w.pow(2).sum(dim=1) / row_counts[rows].clamp_min(1.0)).sum()
    return total


def train_step(
    model: MultiTaskNet,
    weighting: TaskWeighting,
    opt: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, Tensor, Tensor | None],
    tasks: list[TaskConfig],
    tower_l2: float = 0.0,
    batch_l2: tuple[float, Tensor] | None = None,
) -> tuple[float, dict[str, float]]:
    """One optimiser step; returns the objective and the per-task losses. ``batch_l2`` is
    (strength, embedding row counts) for ``batch_embedding_l2``."""
    cats, nums, labels, bias = batch
    out, z = model.forward_with_shared(cats, nums, bias)
    losses = task_losses(out, labels, tasks)
    opt.zero_grad(set_to_none=True)
    loss = float(weighting.backward(losses, z, model, observed_tasks(labels)))
    penalties = []  # regularisers outside the weighting scheme
    if tower_l2 > 0 and (tie := tower_l2_penalty(model)).requires_grad:  # not when all towers are frozen
        penalties.append(tower_l2 * tie)
    if batch_l2 is not None and batch_l2[0] > 0:
        penalties.append(batch_l2[0] * batch_embedding_l2(model, cats, batch_l2[1]))
    if penalties:
        penalty = torch.stack(penalties).sum()
        penalty.backward()  # type: ignore[no-untyped-call]
        loss += float(penalty.detach())
    opt.step()
    weighting.after_step()
    return loss, {k: float(v.detach()) for k, v in losses.items()}


@dataclass
class EarlyStopping:
    """Watches ``monitor`` in its direction and keeps the best epoch's weights."""

    monitor: str
    higher: bool
    patience: int
    best: float = field(init=False)
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None
    bad: int = 0

    def __post_init__(self) -> None:
        self.best = -math.inf if self.higher else math.inf

    def update(self, epoch: int, value: float, model: nn.Module) -> bool:
        """Record an epoch's value; True when training should stop."""
        if not math.isnan(value) and (value > self.best if self.higher else value < self.best):
            self.best, self.best_state, self.best_epoch, self.bad = (
                value,
                copy.deepcopy(model.state_dict()),
                epoch,
                0,
            )
        else:
            self.bad += 1
        if self.bad <= self.patience:
            return False
        log.info(
            "early stopping after epoch %d (best %s=%.4f at epoch %d)",
            epoch,
            self.monitor,
            self.best,
            self.best_epoch,
        )
        return True

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def metrics(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "monitor": self.monitor, "best_monitor": self.best}


def make_optimizer(model: MultiTaskNet, weighting: TaskWeighting, cfg: Config) -> torch.optim.Optimizer:
    """Adam over the network's parameter groups (layer-wise LR) plus the weighting's own parameters."""
    tc = cfg.train
    groups = param_groups(model, tc)
    if weighting.extra_parameters():
        groups.append(
            {"params": weighting.extra_parameters(), "lr": tc.lr * tc.lr_scale, "weight_decay": 0.0}
        )
    if tc.weighting != "static" and any(t.weight != 1.0 for t in cfg.tasks):
        log.warning("tasks[].weight is ignored by train.weighting=%r", tc.weighting)
    return torch.optim.Adam(groups, lr=tc.lr * tc.lr_scale, weight_decay=tc.weight_decay)


def resolve_monitor(cfg: Config, ds: Dataset) -> tuple[str, bool]:
    """The early-stopping metric (on train when there is no validation split) and its direction."""
    monitor = cfg.train.monitor
    if len(ds.valid) == 0 and monitor.startswith("valid/"):
        monitor = "train/" + monitor.split("/", 1)[1]
    return monitor, higher_is_better(monitor)


def fit(
    cfg: Config, ds: Dataset, progress: ProgressFn | None = None, *, init_from: Checkpoint | None = None
) -> TrainResult:
    """Train on ``ds.train`` with early stopping on ``ds.valid``; evaluate on ``ds.test``.

    With ``init_from``, start from that checkpoint's weights; ``ds`` must then be encoded with its
    feature schema (``load_dataset(cfg, schema=ckpt.schema)``, what ``train`` does).
    """
    tc = cfg.train
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    model = build_model(cfg.model, ds.schema, cfg.tasks)
    info: dict[str, Any] = {}
    if init_from is not None:
        if ds.schema.serving().to_dict() != init_from.schema.serving().to_dict():
            raise ConfigError(
                "fine-tuning needs the data encoded with the checkpoint's feature schema: "
                "load_dataset(cfg, schema=checkpoint.schema)"
            )
        info.update(init_from_checkpoint(model, init_from))
    if tc.reset_heads:
        model.reset_heads()
    if tc.freeze:
        info["frozen_parameters"] = freeze(model, tc.freeze)
    weighting = make_weighting(tc, cfg.tasks, ds.train.labels)
    opt = make_optimizer(model, weighting, cfg)
    stopper = EarlyStopping(*resolve_monitor(cfg, ds), tc.patience)
    history: list[dict[str, float]] = []
    n = len(ds.train)
    steps_per_epoch = math.ceil(n / tc.batch_size)
    train_time, seen, global_step = 0.0, 0, 0
    step_log: list[dict[str, float]] = []
    row_counts = embedding_row_counts(model, ds.train.cats)  # (R,) training rows per embedding row
    groups, drop_gen = entity_columns(ds.schema), torch.Generator().manual_seed(tc.seed)
    # cold-start dropout trains the unknown rows; otherwise the unused ones are imputed for serving
    impute = tc.unknown_dropout == 0

    def served() -> contextlib.AbstractContextManager[None]:
        return unknown_rows_imputed(model, row_counts) if impute else contextlib.nullcontext()

    batch_l2 = (tc.embed_batch_l2, row_counts) if tc.embed_batch_l2 > 0 else None
    cats, nums, labels = (torch.from_numpy(a) for a in (ds.train.cats, ds.train.nums, ds.train.labels))
    bias = torch.from_numpy(ds.train.bias) if ds.train.bias is not None else None
    for epoch in range(1, tc.epochs + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        t0 = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        for step in range(steps_per_epoch):
            idx = perm[step * tc.batch_size : (step + 1) * tc.batch_size]
            bc, bn = cats[idx], nums[idx]
            if tc.unknown_dropout > 0:
                bc, bn = drop_to_unknown(bc, bn, groups, tc.unknown_dropout, drop_gen)
            batch = (bc, bn, labels[idx], None if bias is None else bias[idx])
            loss_value, losses = train_step(model, weighting, opt, batch, cfg.tasks, tc.tower_l2, batch_l2)
            weights = weighting.weights()
            sums["train/loss"] += loss_value
            for k, v in losses.items():
                sums[f"train/{k}/loss"] += v
            for k, v in weights.items():
                sums[f"weight/{k}"] += v
            for k, v in weighting.stats().items():
                sums[k] += v
            global_step += 1
            if tc.log_every and global_step % tc.log_every == 0:
                step_log.append(
                    {
                        "step": global_step,
                        "epoch": epoch,
                        "loss": loss_value,
                        **{f"{k}/loss": v for k, v in losses.items()},
                        **{f"weight/{k}": v for k, v in weights.items()},
                    }
                )
                log.debug("step %d: loss %.4f weights %s", global_step, loss_value, weights)
            if progress is not None:
                progress(
                    "step",
                    {
                        "epoch": epoch,
                        "step": step + 1,
                        "steps": steps_per_epoch,
                        "loss": loss_value,
                        "task_losses": losses,
                        "weights": weights,
                    },
                )
        train_time += time.perf_counter() - t0
        seen += n
        row: dict[str, float] = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}}
        split = ds.valid if len(ds.valid) else ds.train
        with served():  # validate the model as it will be served
            row.update(
                evaluate_split(
                    model, split, cfg.tasks, "valid/" if len(ds.valid) else "train/", tc.eval_batch_size
                )
            )
        history.append(row)
        stop = stopper.update(epoch, row.get(stopper.monitor, float("nan")), model)
        log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        if progress is not None:
            progress("epoch", row)
        if stop:
            break
    if tc.restore_best:
        stopper.restore(model)
    model.eval()
    if impute:
        info["unknown_rows_imputed"] = impute_unknown_rows(model, row_counts)
    metrics: dict[str, Any] = stopper.metrics()
    metrics.update(evaluate_split(model, ds.test, cfg.tasks, "test/", tc.eval_batch_size))
    metrics["weighting"] = tc.weighting
    metrics["task_weights"] = {k: round(v, 6) for k, v in weighting.weights().items()}  # final, effective
    metrics.update(info)
    util = expert_utilization(model, ds.test)
    if util is not None:
        metrics["expert_utilization"] = util
    sps = seen / train_time if train_time > 0 else 0.0
    metrics["train_samples_per_sec"] = round(sps, 1)
    return TrainResult(model, metrics, history, stopper.best_epoch, sps, steps=step_log)


def train(
    cfg: Config,
    artifacts: str | Path | None = None,
    progress: ProgressFn | None = None,
    *,
    init_from: str | Path | Checkpoint | None = None,
    force: bool = False,
) -> TrainResult:
    """Load data, fit, and (when ``artifacts`` is given) write a checkpoint and move LATEST to it
    if it passes the promotion gate (``model.promotion``; ``force`` skips it).

    ``init_from``: a checkpoint folder, a version id under ``artifacts`` (or ``LATEST``), or a loaded
    checkpoint to fine-tune from; the data is then encoded with that checkpoint's feature schema.
    """
    t0 = time.perf_counter()
    source = load_init_checkpoint(init_from, artifacts) if init_from is not None else None
    ds = load_dataset(cfg, schema=source.schema if source is not None else None)
    log.info("data loaded in %.1fs", time.perf_counter() - t0)
    result = fit(cfg, ds, progress, init_from=source)
    if artifacts is not None:
        save_result(artifacts, result, cfg, ds, force=force)
    return result


def save_result(
    artifacts: str | Path,
    result: TrainResult,
    cfg: Config,
    ds: Dataset,
    *,
    set_latest: bool = True,
    force: bool = False,
) -> Path:
    """Write a trained result as a checkpoint (with metrics, data fingerprint, per-epoch history
    and the step log); with ``set_latest``, LATEST moves to it if it passes the promotion gate."""
    fp = ds.fingerprint
    decision = (
        promotion.decide(artifacts, cfg, ds.schema, result.metrics, fp, force=force) if set_latest else None
    )
    result.checkpoint = save_checkpoint(
        artifacts,
        result.model,
        cfg,
        ds.schema,
        metrics=result.metrics,
        data_fingerprint=ds.fingerprint,
        extra={"history": result.history, "step_log": result.steps, **promotion.manifest_entry(decision)},
        set_latest=promotion.promoted(decision),
    )
    log.info("wrote %s", result.checkpoint)
    promotion.log_decision(decision, result.checkpoint.name)
    return result.checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m model.train``: one process, or one rank of ``torchrun`` (``WORLD_SIZE`` > 1)."""
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train a config and write a checkpoint; under torchrun (WORLD_SIZE > 1) with DDP.",
    )
    parser.add_argument("--config", required=True, type=Path, help="TOML config file")
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path(os.environ.get("MTRANK_ARTIFACTS") or "artifacts"),
        help="artifacts dir (default $MTRANK_ARTIFACTS or artifacts)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config)
        if args.epochs is not None:
            cfg.train.epochs = args.epochs
        if args.seed is not None:
            cfg.train.seed = args.seed
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from model.distributed import train_distributed

            result = train_distributed(cfg, args.artifacts)
        else:
            result = train(cfg, args.artifacts)
    except (ConfigError, DataError, FeatureError, CheckpointError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    if rank == 0:
        log.info(
            "done: best epoch %d, test/engagement/auc %s, %.0f train samples/s, checkpoint %s",
            result.best_epoch,
            result.metrics.get("test/engagement/auc"),
            result.samples_per_sec,
            result.checkpoint,
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The process group is destroyed and the checkpoint is on disk (fsynced). Leave without
        # running C++ static destructors: gloo's threads can abort the interpreter's teardown
        # ("terminate called without an active exception"), failing a finished job.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
