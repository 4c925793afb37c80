"""Batch trainer: mini-batch Adam on masked, count-normalised per-task losses -- one loop for one
process and for ``torchrun``.

    L = sum_i w_i * L_i,   L_i = mean over the rows of the batch whose label i is observed

(or another task weighting, ``train.weighting``, see ``model.weighting``). Labels may be missing
(NaN), e.g. satisfaction only observed after a click; those rows do not count for that head.
Early stopping watches one validation metric in its right direction and keeps the best weights.
The result is written as a versioned checkpoint (``model.checkpoint``).

Data comes from ``model.data``: the log is prepared once into encoded shards (streamed, memory
bounded by the vocabularies) and read back as shuffled batch *streams*. The loop talks to the
other processes only through a ``model.replica.Replica``: one process is a replica of a world of
one, ``torchrun`` gives ``model.distributed.DistributedReplica``. Per step:

- each rank's batch is its streams' rows; its task losses are scaled by n_i,r * W / N_i (its
  observed labels over the global batch's, one all-reduce of T counts), so the average over
  ranks of the per-rank gradients is exactly the global batch's gradient;
- the weighting scheme takes what it needs of the global batch from the replica (losses, Gram
  matrices, gradient norms; ``model.weighting``), every gradient is averaged over ranks
  (``Replica.average_grads``), and every rank takes the same optimiser step;
- validation and test rows are scored where they live and gathered on rank 0 for the metrics;
  every rank applies rank 0's early-stopping decision.

Around the weighting scheme: ``train.tower_l2`` adds the soft-sharing penalty and
``train.embed_batch_l2`` the mini-batch aware embedding L2 (``batch_embedding_l2``, over the
union of the ranks' batch rows); the bias tower (``model.bias_features``) sees the logged bias
features in training only -- evaluation scores rows exactly as the service does, without them.
Validation / test ``loss`` is always the static sum_i w_i L_i, comparable across weighting schemes.

``train.sparse_embeddings``: the embedding tables take sparse gradients and a lazy Adam
(``torch.optim.SparseAdam``), so a step's cost does not grow with the vocabulary.

Fine-tuning (``init_from``, ``mtrank train --init-from``): the network starts from a checkpoint's
weights (every tensor whose name and shape match; the data is encoded with the checkpoint's own
feature schema, so embedding rows keep their meaning), optionally with ``train.reset_heads``,
``train.freeze`` (modules by name), ``train.lr_scale`` and ``train.layer_lr_decay``.

Resuming (``train(..., resume=True)``, ``mtrank train --resume``): after every epoch the model,
optimisers, data-stream generators and bookkeeping are written to ``<artifacts>/runs/<id>/``
(``model.runstate``); a resumed run continues after the last complete epoch and ends with the
same weights as an uninterrupted one.

``python -m model.train --config X --artifacts A`` trains in one process (like ``mtrank train``);
under ``torchrun --nproc_per_node=N -m model.train ...`` on N ranks (``model.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import logging
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import promotion
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from model.combination import fit_ranking
from model.config import Config, ConfigError, TaskConfig, TrainConfig, load_config
from model.data import DataError, Dataset, Split, prepare_data
from model.data.loader import (
    AnySplit,
    Stream,
    iter_batches,
    sharded,
    stream_rng,
    zip_streams,
)
from model.features import FeatureError, FeatureSchema
from model.metrics import evaluate_predictions, higher_is_better
from model.nets import PLE, History, MMoE, MultiTaskNet, build_model
from model.replica import Replica, resolve_device
from model.runstate import load_state, remove_run, run_dir, save_state
from model.scoring import combine_scores, head_outputs
from model.weighting import PCGradWeighting, TaskWeighting, make_weighting, tower_l2_penalty

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


def return_freed_memory() -> None:
    """Hand memory the data passes or an epoch freed back to the OS: Python's unreachable cycles,
    pyarrow's pool and glibc's malloc arenas, which otherwise keep freed blocks for reuse, so the
    process would stay at the passes' peak through training and evaluation."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere nothing to call
        ctypes.CDLL(None).malloc_trim(0)


@dataclass
class Scored:
    """A split's rows as scored by a model: per-head scores, labels, list groups and fragments (in
    row order), and per task the summed loss over the observed labels and their count."""

    heads: dict[str, np.ndarray]
    labels: np.ndarray
    groups: np.ndarray
    fragments: np.ndarray
    loss_sums: np.ndarray
    loss_counts: np.ndarray


@torch.inference_mode()
def score_split(model: MultiTaskNet, split: AnySplit, tasks: list[TaskConfig], batch_size: int) -> Scored:
    """One pass over a split (read part by part into preallocated arrays: a test split of tens of
    millions of rows costs its outputs, not twice them)."""
    model.eval()
    device = next(model.parameters()).device
    n = len(split)
    heads = {t.name: np.empty(n, dtype=np.float32) for t in tasks}  # the network's float32 outputs
    labels = np.empty((n, len(tasks)), dtype=np.float32)
    groups = np.empty(n, dtype=np.int64)
    frags = np.zeros(n, dtype=np.int32)
    sums, counts = np.zeros(len(tasks)), np.zeros(len(tasks))
    at = 0
    for b in iter_batches(split, batch_size):
        end = at + len(b)
        raw = model(
            torch.from_numpy(np.asarray(b.cats, dtype=np.int64)).to(device),
            torch.from_numpy(b.nums).to(device),
            None,
            history_tensors(b.seqs, device),
        )
        for k, v in head_outputs(raw, tasks).items():
            heads[k][at:end] = v
        labels[at:end], groups[at:end] = b.labels, b.users
        if b.fragments is not None:
            frags[at:end] = b.fragments
        y = torch.from_numpy(b.labels).to(device)
        for t, task in enumerate(tasks):
            seen = ~torch.isnan(y[:, t])
            sums[t] += float(_loss(raw[task.name][seen], y[seen, t], task.kind, "sum"))
            counts[t] += int(seen.sum())
        at = end
    return Scored(heads, labels, groups, frags, sums, counts)


def predict(
    model: MultiTaskNet, split: AnySplit, tasks: list[TaskConfig], batch_size: int = 8192
) -> dict[str, np.ndarray]:
    """Per-head scores in label space for every row of a split (float64)."""
    return {k: v.astype(np.float64) for k, v in score_split(model, split, tasks, batch_size).heads.items()}


def evaluate_split(
    model: MultiTaskNet,
    split: AnySplit,
    tasks: list[TaskConfig],
    prefix: str,
    batch_size: int = 8192,
    *,
    replica: Replica | None = None,
    grouped: bool = True,
) -> dict[str, float]:
    """Metrics of a split: every head's, NDCG@10 of the combined score (``grouped``: per list
    group; GAUC too), and the static objective's ``loss`` (each task's loss is its mean over the
    split's observed labels, whatever the batch size). Data parallel: each rank scores its own rows,
    rank 0 gathers them (in fragment order, as one process reads them) and alone returns metrics."""
    sc = score_split(model, split, tasks, batch_size)
    heads, labels, groups, frags, sums, counts = (
        sc.heads,
        sc.labels,
        sc.groups,
        sc.fragments,
        sc.loss_sums,
        sc.loss_counts,
    )
    del sc
    if replica is not None and replica.distributed:
        gathered = replica.gather_to_root((heads, labels, groups, frags, sums, counts))
        if gathered is None:
            return {}
        order = np.argsort(np.concatenate([g[3] for g in gathered]), kind="stable")
        heads = {t.name: np.concatenate([g[0][t.name] for g in gathered])[order] for t in tasks}
        labels = np.concatenate([g[1] for g in gathered if len(g[1])])[order] if len(order) else labels
        groups = np.concatenate([g[2] for g in gathered])[order]
        sums, counts = np.sum([g[4] for g in gathered], axis=0), np.sum([g[5] for g in gathered], axis=0)
    if len(groups) == 0:
        return {}
    weights = {t.name: 1.0 for t in tasks if t.kind == "binary"} or {t.name: 1.0 for t in tasks}
    combined = np.empty(len(groups))
    for i in range(0, len(groups), 1 << 20):  # in float64, in chunks
        part = {k: v[i : i + (1 << 20)].astype(np.float64) for k, v in heads.items()}
        combined[i : i + (1 << 20)] = combine_scores(part, weights, "product")
    metrics = evaluate_predictions(tasks, labels, heads, groups if grouped else None, combined, prefix=prefix)
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    metrics[f"{prefix}loss"] = float(sum(t.weight * m for t, m in zip(tasks, means, strict=True)))
    return metrics


@torch.no_grad()
def expert_utilization(
    model: MultiTaskNet, split: AnySplit, max_rows: int = 20000
) -> dict[str, list[float]] | None:
    """Mean gate probability of each expert per gate; a collapsed gate puts ~1 on one expert.

    MMoE: one row per task over its E experts. PLE: one row per gate over all experts of its level
    (task 0's experts, task 1's, ..., shared experts; 0 where a gate cannot look); the last level's
    task gates are keyed by task name, earlier levels' by ``level<k>/<task>`` and ``level<k>/shared``.
    """
    if not isinstance(model, MMoE | PLE) or len(split) == 0:
        return None
    model.eval()
    rows = next(iter_batches(split, max_rows))
    device = next(model.parameters()).device
    cats = torch.from_numpy(np.asarray(rows.cats, dtype=np.int64)).to(device)
    nums = torch.from_numpy(rows.nums).to(device)
    hist = history_tensors(rows.seqs, device)
    if isinstance(model, MMoE):
        mean = model.gate_weights(cats, nums, hist).mean(dim=0)  # (T, E)
        return {t: [round(float(x), 4) for x in mean[i]] for i, t in enumerate(model.tasks)}
    levels = model.gate_weights_by_level(cats, nums, hist)
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
    ranking: dict[str, Any] | None = None  # the fitted served combination (model.combination)


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
                values.append(n @ w[a + 1 : b].detach() / n.sum())  # (V,) @ (V, D) -> (D,): no (V, D) copy
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


def batch_embedding_l2(
    model: MultiTaskNet, cats: Tensor, row_counts: Tensor, replica: Replica | None = None
) -> Tensor:
    """Mini-batch aware regularisation (Zhou et al., KDD 2018, DIN section 4.1): the L2 norm of the
    embedding rows the batch uses, each divided by its row's count n_j in the training split, i.e.
    sum_{j in batch} ||w_j||^2 / n_j, so over an epoch each row is penalised about once, however
    often it appears, and rows a batch does not touch are left alone. Data parallel: the rows of
    the global batch (the union over ranks), the same penalty on every rank."""
    total = torch.zeros((), device=row_counts.device)
    for e in model.feature_embeddings():
        rows = torch.unique(cats + e.offsets)  # (R,)
        if replica is not None and replica.distributed:
            rows = torch.unique(replica.cat(rows))
        w = F.embedding(rows, e.emb.weight, sparse=True) if e.emb.sparse else e.emb.weight[rows]  # (R, D)
        total = total + (w.pow(2).sum(dim=1) / row_counts[rows].clamp_min(1.0)).sum()
    return total


# cats (B, C) int64, nums, labels, bias, histories (sequence -> items (B, L, K), lengths (B,))
Batch = tuple[Tensor, Tensor, Tensor, Tensor | None, History | None]


def history_tensors(seqs: Mapping[str, np.ndarray], device: torch.device | None = None) -> History | None:
    """A split's history arrays (``seq.<name>.items`` / ``.len``) as the network's input."""
    if not seqs:
        return None
    names = [k[len("seq.") : -len(".items")] for k in seqs if k.endswith(".items")]
    out = {}
    for n in names:
        items = torch.from_numpy(np.asarray(seqs[f"seq.{n}.items"], dtype=np.int64))
        lens = torch.from_numpy(np.asarray(seqs[f"seq.{n}.len"], dtype=np.int64))
        out[n] = (items, lens) if device is None else (items.to(device), lens.to(device))
    return out


def to_tensors(part: Split) -> Batch:
    cats = torch.from_numpy(np.asarray(part.cats, dtype=np.int64))
    bias = torch.from_numpy(np.asarray(part.bias, dtype=np.int64)) if part.bias is not None else None
    return cats, torch.from_numpy(part.nums), torch.from_numpy(part.labels), bias, history_tensors(part.seqs)


def cat_batches(parts: Sequence[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    bias = None if parts[0][3] is None else torch.cat([p[3] for p in parts])  # type: ignore[misc]
    hist = None
    if parts[0][4] is not None:
        hist = {
            k: (torch.cat([p[4][k][0] for p in parts]), torch.cat([p[4][k][1] for p in parts]))  # type: ignore[index]
            for k in parts[0][4]
        }
    return (
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
        bias,
        hist,
    )


def padding_batch(schema: FeatureSchema, n_tasks: int) -> Batch:
    """A batch of no rows: a rank whose stream has run out takes part in the step (every rank runs
    the same steps, and its zero gradients join the average) without adding to any loss."""
    bias = torch.zeros(0, len(schema.bias), dtype=torch.long) if schema.bias else None
    hist = {
        q.name: (torch.zeros(0, q.max_len, q.width, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        for q in schema.sequences
    }
    return (
        torch.zeros(0, schema.n_cats, dtype=torch.long),
        torch.zeros(0, schema.n_nums),
        torch.zeros(0, n_tasks),
        bias,
        hist or None,
    )


def global_loss_scale(local_labels: Tensor, n_global: Tensor, world_size: int) -> Tensor:
    """Per-task factor (T,) n_r * W / N turning this rank's mean over its n_r observed labels into its
    share of the mean over the N observed labels of the global batch (the average over ranks of
    the scaled per-rank losses is then exactly the global batch's loss). 1 where N = 0."""
    n_local = (~torch.isnan(local_labels)).sum(dim=0).to(torch.float64)
    n_global = n_global.to(torch.float64)
    return torch.where(n_global > 0, n_local * world_size / n_global.clamp_min(1.0), 1.0).float()


def train_step(
    model: MultiTaskNet,
    weighting: TaskWeighting,
    opt: Optimizers,
    batch: Batch,
    tasks: list[TaskConfig],
    tower_l2: float = 0.0,
    batch_l2: tuple[float, Tensor] | None = None,
    replica: Replica | None = None,
) -> tuple[float, dict[str, float]]:
    """One optimiser step; returns the objective and the per-task losses (this rank's shares of the
    global batch's). ``batch_l2`` is (strength, embedding row counts) for ``batch_embedding_l2``."""
    cats, nums, labels, bias, hist = batch
    out, z = model.forward_with_shared(cats, nums, bias, hist)
    losses = task_losses(out, labels, tasks)
    if replica is not None and replica.distributed:
        # this rank's mean over its n_i observed labels -> its share of the mean over the global
        # batch's N_i: the average over ranks of the scaled losses is the global batch's loss
        n_global = replica.sum((~torch.isnan(labels)).sum(dim=0).to(torch.float64))
        scale = global_loss_scale(labels, n_global, replica.world)
        losses = {t.name: losses[t.name] * scale[i] for i, t in enumerate(tasks)}
        seen = (n_global > 0).cpu()
    else:
        seen = observed_tasks(labels)
    opt.zero_grad()
    loss = float(weighting.backward(losses, z, model, seen, replica))
    penalties = []  # regularisers outside the weighting scheme (the same on every rank)
    if tower_l2 > 0 and (tie := tower_l2_penalty(model)).requires_grad:  # not when all towers are frozen
        penalties.append(tower_l2 * tie)
    if batch_l2 is not None and batch_l2[0] > 0:
        penalties.append(batch_l2[0] * batch_embedding_l2(model, cats, batch_l2[1], replica))
    if penalties:
        penalty = torch.stack(penalties).sum()
        penalty.backward()  # type: ignore[no-untyped-call]
        loss += float(penalty.detach())
    if replica is not None and replica.distributed:
        replica.average_grads(opt.params())
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

    def state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad": self.bad,
            "best_state": self.best_state,
        }

    def load(self, s: Mapping[str, Any]) -> None:
        self.best, self.best_epoch, self.bad, self.best_state = (
            s["best"],
            s["best_epoch"],
            s["bad"],
            s["best_state"],
        )


class Optimizers:
    """Adam over the dense parameters, and ``torch.optim.SparseAdam`` (a lazy Adam: only the rows a
    batch touches are read and updated) over sparse embedding tables, stepped as one."""

    def __init__(self, opts: Sequence[torch.optim.Optimizer]) -> None:
        self.opts = list(opts)

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def params(self) -> list[Tensor]:
        return [p for o in self.opts for g in o.param_groups for p in g["params"]]

    def state_dict(self) -> list[dict[str, Any]]:
        return [o.state_dict() for o in self.opts]

    def load_state_dict(self, states: Sequence[Mapping[str, Any]]) -> None:
        for o, s in zip(self.opts, states, strict=True):
            o.load_state_dict(dict(s))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.opts for g in o.param_groups]


def make_optimizer(model: MultiTaskNet, weighting: TaskWeighting, cfg: Config) -> Optimizers:
    """Adam over the network's parameter groups (layer-wise LR) plus the weighting's own parameters;
    sparse embedding tables (``train.sparse_embeddings``) in a SparseAdam of their own."""
    tc = cfg.train
    groups = param_groups(model, tc)
    sparse_ids = {id(e.emb.weight) for e in model.feature_embeddings() if e.emb.sparse}
    dense, sparse = [], []
    for g in groups:
        ps = [p for p in g["params"] if id(p) not in sparse_ids]
        sp = [p for p in g["params"] if id(p) in sparse_ids]
        if ps:
            dense.append({**g, "params": ps})
        if sp:
            sparse.append({"params": sp, "lr": g["lr"], "depth": g["depth"]})
    if weighting.extra_parameters():
        dense.append({"params": weighting.extra_parameters(), "lr": tc.lr * tc.lr_scale, "weight_decay": 0.0})
    if tc.weighting.kind != "static" and any(t.weight != 1.0 for t in cfg.tasks):
        log.warning("tasks[].weight is ignored by train.weighting=%r", tc.weighting.kind)
    opts: list[torch.optim.Optimizer] = []
    if dense:
        opts.append(torch.optim.Adam(dense, lr=tc.lr * tc.lr_scale, weight_decay=tc.weight_decay))
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=tc.lr * tc.lr_scale))
    return Optimizers(opts)


def resolve_monitor(cfg: Config, ds: Dataset, has_valid: bool | None = None) -> tuple[str, bool]:
    """The early-stopping metric (on train when there is no validation split) and its direction."""
    cfg.check_monitor()
    monitor = cfg.monitor
    if has_valid is None:
        has_valid = len(ds.valid) > 0
    if not has_valid and monitor.startswith("valid/"):
        log.warning("no validation rows: early stopping watches the training split's %s", monitor)
        monitor = "train/" + monitor.split("/", 1)[1]
    return monitor, higher_is_better(monitor)


def stream_sizes(ds: Dataset, n_streams: int) -> list[int]:
    """Train rows of each stream, over all ranks."""
    if ds.fragment_rows:
        sizes = [0] * n_streams
        for frag, rows in ds.fragment_rows.items():
            sizes[frag % n_streams] += rows
        return sizes
    train = ds.train
    if isinstance(train, Split) and train.fragments is not None:
        return np.bincount(train.fragments % n_streams, minlength=n_streams).tolist()  # type: ignore[no-any-return]
    return [len(train)] + [0] * (n_streams - 1)


def reference_labels(ds: Dataset) -> npt.NDArray[np.float32] | list[dict[str, float]]:
    """What a weighting's "constant" reference is computed from: the train labels when they are in
    memory, else their statistics from data preparation."""
    if isinstance(ds.train, Split) or ds.label_stats is None:
        return ds.train.labels
    return ds.label_stats


def fit(
    cfg: Config,
    ds: Dataset,
    progress: ProgressFn | None = None,
    *,
    init_from: Checkpoint | None = None,
    replica: Replica | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train on ``ds.train`` with early stopping on ``ds.valid``; evaluate on ``ds.test``.

    With ``init_from``, start from that checkpoint's weights; ``ds`` must then be encoded with its
    feature schema (``load_dataset(cfg, schema=ckpt.schema)``, what ``train`` does). ``replica``:
    this process's place in a data-parallel job (default: one process on ``train.device``).
    ``state_dir``: where the resumable state is written after each epoch (and read from when
    ``resume``). Every rank returns a TrainResult; rank 0's has the metrics.
    """
    tc = cfg.train
    replica = replica or Replica(resolve_device(tc.device))
    W, rank, device = replica.world, replica.rank, replica.device
    S = tc.streams or W
    if S % W != 0 or tc.batch_size % S != 0:
        raise ConfigError(
            f"train.streams = {S} must be a multiple of the world size {W}, and train.batch_size = "
            f"{tc.batch_size} divisible by it (each stream's batch is batch_size / streams)"
        )
    torch.manual_seed(tc.seed)
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
    if rank > 0:  # dropout masks differ per rank; rank 0 keeps the single-process stream
        torch.manual_seed(int(np.random.SeedSequence([tc.seed, rank]).generate_state(1)[0]))
    model.to(device)
    for e in model.feature_embeddings():
        e.emb.sparse = tc.sparse_embeddings
    weighting = make_weighting(tc, cfg.tasks, reference_labels(ds)).to(device)
    if isinstance(weighting, PCGradWeighting) and replica.distributed:
        weighting.generator = torch.Generator().manual_seed(tc.seed)  # the same order on every rank
    opt = make_optimizer(model, weighting, cfg)
    global_valid = ds.fingerprint.get("valid_rows", len(ds.valid)) if replica.distributed else len(ds.valid)
    validate_on = ds.valid if global_valid else ds.train
    stopper = EarlyStopping(*resolve_monitor(cfg, ds, bool(global_valid)), tc.patience)
    history: list[dict[str, float]] = []
    b = tc.batch_size // S  # rows per stream and step
    mine = [s for s in range(S) if s % W == rank]  # the streams this process reads
    streams = [Stream(ds.train, s, S, stream_rng(tc.seed, s, S), tc.shuffle_buffer) for s in mine]
    steps_per_epoch = max(-(-n // b) for n in stream_sizes(ds, S))
    train_time, seen, global_step, start = 0.0, 0, 0, 1
    n_train = sum(stream_sizes(ds, S))
    step_log: list[dict[str, float]] = []
    if ds.row_counts is not None:
        row_counts = torch.from_numpy(ds.row_counts.astype(np.float32)).to(device)
    else:
        assert isinstance(ds.train, Split), "a shard-backed dataset carries its row counts"
        row_counts = embedding_row_counts(model, np.asarray(ds.train.cats, dtype=np.int64)).to(device)
    groups = entity_columns(ds.schema)
    drop_gens = [
        torch.Generator().manual_seed(
            tc.seed if S == 1 else int(np.random.SeedSequence([tc.seed, s, S]).generate_state(1)[0])
        )
        for s in mine
    ]
    # cold-start dropout trains the unknown rows; otherwise the unused ones are imputed for serving
    impute = tc.unknown_dropout == 0

    def served() -> contextlib.AbstractContextManager[None]:
        return unknown_rows_imputed(model, row_counts) if impute else contextlib.nullcontext()

    def batch_of(k: int, part: Split) -> Batch:
        bc, bn, by, bb, bh = to_tensors(part)
        if tc.unknown_dropout > 0:
            bc, bn = drop_to_unknown(bc, bn, groups, tc.unknown_dropout, drop_gens[k])
        return bc, bn, by, bb, bh

    batch_l2 = (tc.embed_batch_l2, row_counts) if tc.embed_batch_l2 > 0 else None

    def snapshot(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "global_step": global_step,
            "train_time": train_time,
            "seen": seen,
            "history": history,
            "step_log": step_log,
            "stopper": stopper.state(),
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "weighting": weighting.state_dict(),
            "weighting_extra": weighting.extra_state(),
            "torch_rng": torch.get_rng_state(),
            "streams": [s.rng.bit_generator.state for s in streams],
            "drop_gens": [g.get_state() for g in drop_gens],
        }

    if resume and state_dir is not None and (state := load_state(state_dir / f"rank{rank}")) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        weighting.load_state_dict(state["weighting"])
        weighting.load_extra_state(state["weighting_extra"])
        stopper.load(state["stopper"])
        torch.set_rng_state(state["torch_rng"])
        for s, st in zip(streams, state["streams"], strict=True):
            s.rng.bit_generator.state = st
        for g, st in zip(drop_gens, state["drop_gens"], strict=True):
            g.set_state(st)
        history, step_log = list(state["history"]), list(state["step_log"])
        global_step, train_time, seen = state["global_step"], state["train_time"], state["seen"]
        start = state["epoch"] + 1
        done = bool(history) and (state["epoch"] >= tc.epochs or state.get("stopped", False))
        log.info("resuming after epoch %d from %s", state["epoch"], state_dir)
        if done:
            start = tc.epochs + 1
    elif resume:
        log.warning("--resume: no interrupted run of this config to resume: training from the first epoch")
    for epoch in range(start, tc.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        logged: list[tuple[int, dict[str, float]]] = []
        logged_losses: list[list[float]] = []
        for step, subs in enumerate(zip_streams(streams, b, steps_per_epoch)):
            parts = [batch_of(k, p) for k, p in enumerate(subs) if p is not None]
            batch = cat_batches(parts) if parts else padding_batch(ds.schema, len(cfg.tasks))
            batch = (
                batch[0].to(device),
                batch[1].to(device),
                batch[2].to(device),
                None if batch[3] is None else batch[3].to(device),
                None
                if batch[4] is None
                else {k: (v.to(device), n.to(device)) for k, (v, n) in batch[4].items()},
            )
            loss_value, losses = train_step(
                model, weighting, opt, batch, cfg.tasks, tc.tower_l2, batch_l2, replica
            )
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
                logged.append((global_step, {f"weight/{k}": v for k, v in weights.items()}))
                logged_losses.append([loss_value, *(losses[t.name] for t in cfg.tasks)])
                log.debug("step %d: loss %.4f weights %s", global_step, loss_value, weights)
            if progress is not None and rank == 0:
                progress(
                    "step",
                    {
                        "epoch": epoch,
                        "epochs": tc.epochs,
                        "step": step + 1,
                        "steps": steps_per_epoch,
                        "loss": loss_value,
                        "task_losses": losses,
                        "weights": weights,
                    },
                )
        if logged:
            # the ranks' loss shares of each logged step add up to the global batch's losses
            values = replica.sum(torch.tensor(logged_losses, dtype=torch.float64)) / W  # (S, 1 + T)
            for (at, w), (loss, *task) in zip(logged, values.tolist(), strict=True):
                per_task = {f"{t.name}/loss": v for t, v in zip(cfg.tasks, task, strict=True)}
                step_log.append({"step": at, "epoch": epoch, "loss": loss, **per_task, **w})
        if W > 1:
            keys = sorted(sums)
            total = replica.sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)) / W
            sums = dict(zip(keys, total.tolist(), strict=True))
        train_time += time.perf_counter() - t0
        seen += n_train
        row: dict[str, float] = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}}
        with served():  # validate the model as it will be served
            row.update(
                evaluate_split(
                    model,
                    validate_on,
                    cfg.tasks,
                    "valid/" if global_valid else "train/",
                    tc.eval_batch_size,
                    replica=replica,
                    grouped=ds.grouped,
                )
            )
        value = replica.broadcast(row.get(stopper.monitor, float("nan")))
        stop = stopper.update(epoch, value, model)
        history.append(row)
        if rank == 0:
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
            if progress is not None:
                progress("epoch", {**row, "epochs": tc.epochs, "seconds": train_time})
        if state_dir is not None and tc.save_state:
            save_state(state_dir / f"rank{rank}", {**snapshot(epoch), "stopped": stop})
        if stop:
            break
    if tc.restore_best:
        stopper.restore(model)
    model.eval()
    if impute:
        info["unknown_rows_imputed"] = impute_unknown_rows(model, row_counts)
    return_freed_memory()  # the epochs' stream buffers: the test split's scores need the room
    metrics: dict[str, Any] = stopper.metrics()
    metrics.update(
        evaluate_split(
            model, ds.test, cfg.tasks, "test/", tc.eval_batch_size, replica=replica, grouped=ds.grouped
        )
    )
    metrics["weighting"] = tc.weighting.kind
    metrics["task_weights"] = {k: round(v, 6) for k, v in weighting.weights().items()}  # final, effective
    metrics.update(info)
    util = expert_utilization(model, ds.test)
    if util is not None:
        metrics["expert_utilization"] = util
    sps = seen / train_time if train_time > 0 else 0.0
    metrics["train_samples_per_sec"] = round(sps, 1)  # all ranks' rows per second
    if replica.distributed:
        metrics["distributed"] = {
            "world_size": W,
            "backend": getattr(replica, "backend", "?"),
            "per_rank_batch_size": tc.batch_size // W,
        }
    if S > 1:
        metrics["streams"] = S
    if rank > 0:
        metrics = {}
    return TrainResult(model.cpu(), metrics, history, stopper.best_epoch, sps, steps=step_log)


def train(
    cfg: Config,
    artifacts: str | Path | None = None,
    progress: ProgressFn | None = None,
    *,
    init_from: str | Path | Checkpoint | None = None,
    replica: Replica | None = None,
    resume: bool = False,
    set_latest: bool = True,
    force: bool = False,
) -> TrainResult:
    """Prepare the data, fit, and (when ``artifacts`` is given) write a checkpoint (rank 0 only) and
    move LATEST to it if it passes the promotion gate (``model.promotion``; ``force`` skips it).

    ``init_from``: a checkpoint folder, a version id under ``artifacts`` (or ``LATEST``), or a loaded
    checkpoint to fine-tune from; the data is then encoded with that checkpoint's feature schema.
    ``resume``: continue the same config's interrupted run from its last complete epoch.
    """
    replica = replica or Replica(resolve_device(cfg.train.device))
    t0 = time.perf_counter()
    source = load_init_checkpoint(init_from, artifacts) if init_from is not None else None
    schema = source.schema if source is not None else None
    with contextlib.ExitStack() as stack:
        cache = None
        if artifacts is None and cfg.data.cache_dir is None and not os.environ.get("MTRANK_CACHE_DIR"):
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="mtrank-data-"))
        prepared = prepare_data(cfg, artifacts, schema=schema, exchange=replica, cache_dir=cache)
        mine = None
        if replica.distributed:  # this rank's fragments: i % world == rank
            mine = {s.fragment for s in prepared.shards if s.fragment % replica.world == replica.rank}
        ds = sharded(prepared, mine)
        return_freed_memory()  # the data passes' working memory, before the model is built
        log.info("data prepared in %.1fs", time.perf_counter() - t0)
        if progress is not None and replica.rank == 0:
            progress("data", dict(prepared.fingerprint))
        state_dir = None
        if artifacts is not None:
            state_dir = run_dir(artifacts, cfg, str(source.path) if source is not None else None)
        result = fit(cfg, ds, progress, init_from=source, replica=replica, state_dir=state_dir, resume=resume)
        fit_ranking(cfg, result, ds, replica=replica)  # calibration and the served combination
        if artifacts is not None and replica.rank == 0:
            save_result(artifacts, result, cfg, ds, set_latest=set_latest, force=force)
        replica.barrier()
        if state_dir is not None and replica.rank == 0:
            remove_run(state_dir)
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
        extra={
            "history": result.history,
            "step_log": result.steps,
            **promotion.manifest_entry(decision),
            **({"ranking": result.ranking} if result.ranking else {}),
        },
        set_latest=promotion.promoted(decision),
    )
    log.info("wrote %s", result.checkpoint)
    promotion.log_decision(decision, result.checkpoint.name)
    return result.checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m model.train``: one process, or one rank of ``torchrun`` (``WORLD_SIZE`` > 1)."""
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train a config and write a checkpoint; under torchrun (WORLD_SIZE > 1) data parallel.",
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
    parser.add_argument("--streams", type=int, default=None, help="override train.streams")
    parser.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda, ...)")
    parser.add_argument("--init-from", default=None, help="fine-tune from a checkpoint folder or version")
    parser.add_argument("--resume", action="store_true", help="continue this config's interrupted run")
    parser.add_argument("--force", action="store_true", help="move LATEST even if the promotion gate says no")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
        if args.streams is not None:
            cfg.train.streams = args.streams
        if args.device is not None:
            cfg.train.device = args.device
        if world > 1:
            from model.distributed import train_distributed

            result = train_distributed(
                cfg, args.artifacts, init_from=args.init_from, resume=args.resume, force=args.force
            )
        else:
            result = train(
                cfg, args.artifacts, init_from=args.init_from, resume=args.resume, force=args.force
            )
    except (ConfigError, DataError, FeatureError, CheckpointError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    if rank == 0:
        log.info(
            "done: best epoch %d, %.0f train samples/s, checkpoint %s, test metrics %s",
            result.best_epoch,
            result.samples_per_sec,
            result.checkpoint,
            {
                k: round(v, 4)
                for k, v in result.metrics.items()
                if k.startswith("test/") and isinstance(v, float)
            },
        )
    if world > 1:
        # The process group is destroyed and the checkpoint is on disk (fsynced). Leave without
        # running C++ static destructors: gloo's threads can abort the interpreter's teardown
        # ("terminate called without an active exception"), failing a finished job.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
