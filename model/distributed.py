"""Data-parallel training with ``torch.distributed`` (DDP): ``torchrun --nproc_per_node=N -m model.train``.

``python -m model.train`` (``model.train.main``) trains in one process; started by ``torchrun`` (the
environment has ``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``) it
calls ``train_distributed``, which reproduces single-process training of the same config:

- backend gloo on CPU, nccl (one GPU per ``LOCAL_RANK``) when CUDA is available; the network is
  wrapped in ``DistributedDataParallel`` (gradients averaged over ranks in the backward pass).
- Every rank loads and encodes the whole data set (vocabularies and statistics are fitted on the train
  split deterministically; a digest of the fitted schema and the data fingerprint is compared across
  ranks before training) and shards the train rows by index: each epoch one global permutation from
  ``train.seed`` (the same generator ``fit`` uses), padded with ``-1`` to a multiple of the world size;
  rank r takes the strided slice ``perm[r::W]`` (``rank_shard``). Per-rank batch = ``batch_size / W``,
  so global step s covers exactly the rows of single-process step s, every rank does the same number of
  steps (DDP needs that), and the padded slots (at most W - 1 per epoch) are rows whose labels are
  masked: they run through the forward pass and carry no loss. Nothing is dropped.
- Loss normalisation. ``task_losses`` averages task i over the observed labels of *this rank's* batch;
  with masked labels (``mask_by``, NaN) the counts differ between ranks, and the DDP average of per-rank
  means is not the mean over the global batch. Each rank therefore scales its L_i by
  n_i,r * W / N_i (n_i,r its observed labels, N_i those of the global batch, known locally since every
  rank holds all labels), which makes the averaged gradient exactly the single-process one.
- Rank 0 evaluates the validation split after each epoch and broadcasts the early-stopping decision;
  at the end it restores the best epoch's weights, evaluates the test split and alone writes the
  checkpoint and LATEST (``model.checkpoint``, atomic). All ranks meet at a barrier and leave the group.
- Dropout / gate dropout / bias-feature dropout draw from a per-rank seed (rank 0 keeps the
  single-process stream), so their randomness differs from a single-process run.

Weightings: ``static`` and ``uncertainty`` (its s_i are outside the DDP module; their gradients are
all-reduced). ``mgda``, ``pcgrad``, ``gradnorm`` (per-task gradients / their norms are nonlinear in the
batch, so per-rank values averaged are not the global ones) and ``worst_case`` (a nonlinear function of
the per-rank losses) are rejected with a ``ConfigError``. The step log (``train.log_every``) holds the
same records as in ``fit``: the ranks' loss shares are summed once per epoch (one all-reduce of the
epoch's logged steps), which gives the global batch's losses exactly. Fine-tuning from a
checkpoint (``--init-from``) is not offered here; ``train.freeze`` / ``reset_heads`` / ``lr_scale`` /
``layer_lr_decay`` / ``tower_l2`` work as in ``fit``.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model.config import Config, ConfigError
from model.data import Dataset, load_dataset
from model.nets import MultiTaskNet, build_model
from model.train import (
    EarlyStopping,
    TrainResult,
    embedding_row_counts,
    evaluate_split,
    expert_utilization,
    freeze,
    impute_unknown_rows,
    make_optimizer,
    observed_tasks,
    resolve_monitor,
    save_result,
    task_losses,
    unknown_rows_imputed,
)
from model.weighting import make_weighting, tower_l2_penalty

log = logging.getLogger(__name__)

DDP_WEIGHTINGS: tuple[str, ...] = ("static", "uncertainty")
TIMEOUT = dt.timedelta(minutes=10)  # a collective waiting longer than this fails instead of hanging


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def check_supported(cfg: Config, world_size: int) -> None:
    """Raise ConfigError for a config this trainer cannot run faithfully on ``world_size`` ranks."""
    tc = cfg.train
    if tc.weighting not in DDP_WEIGHTINGS:
        raise ConfigError(
            f"train.weighting={tc.weighting!r} is not supported with distributed training "
            f"(supported: {', '.join(DDP_WEIGHTINGS)}): it needs per-task gradients or losses of the "
            "global batch, which per-rank averaging does not give. Train it in one process."
        )
    if tc.embed_batch_l2 > 0:
        raise ConfigError(
            "train.embed_batch_l2 is not supported with distributed training: it penalises the "
            "embedding rows of the global batch once each, which per-rank penalties would count once "
            "per rank. Use train.embed_weight_decay, or train in one process."
        )
    if tc.unknown_dropout > 0:
        raise ConfigError(
            "train.unknown_dropout is not supported with distributed training yet (its draws would "
            "differ from a single process's); train in one process."
        )
    if tc.batch_size % world_size != 0:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be divisible by the world size {world_size} "
            "(per-rank batch = batch_size / world size)"
        )


def init_distributed() -> DistEnv:
    """Join the process group torchrun described in the environment (env:// rendezvous)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    env = DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)
    log.info("rank %d of %d (local %d), backend %s", env.rank, env.world_size, local_rank, backend)
    return env


def rank_shard(perm: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s rows of an epoch: the strided slice ``perm[rank::world_size]`` of ``perm`` padded
    with ``-1`` to a multiple of ``world_size``. All ranks get the same length; the real entries of the
    shards are disjoint and together are ``perm``; consecutive per-rank batches of ``B / world_size``
    together are the consecutive global batches of ``B`` rows of ``perm``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    pad = (-len(perm)) % world_size
    padded = np.concatenate([np.asarray(perm, dtype=np.int64), np.full(pad, -1, dtype=np.int64)])
    return padded[rank::world_size]


def global_loss_scale(local_labels: Tensor, global_labels: Tensor, world_size: int) -> Tensor:
    """Per-task factor (T,) n_r * W / N turning this rank's mean over its n_r observed labels into its
    share of the mean over the N observed labels of the global batch (the DDP average of the scaled
    per-rank losses is then exactly the global-batch loss). 1 where the global batch has none."""
    n_local = (~torch.isnan(local_labels)).sum(dim=0).to(torch.float64)
    n_global = (~torch.isnan(global_labels)).sum(dim=0).to(torch.float64)
    scale = torch.where(n_global > 0, n_local * world_size / n_global.clamp_min(1.0), 1.0)
    return scale.to(torch.float32)


class _WithShared(nn.Module):
    """DDP calls ``forward``; the trainer needs ``forward_with_shared`` (outputs and z)."""

    def __init__(self, net: MultiTaskNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, cats: Tensor, nums: Tensor, bias: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        return self.net.forward_with_shared(cats, nums, bias)


def _schema_digest(ds: Dataset) -> str:
    blob = json.dumps(
        {"schema": ds.schema.to_dict(), "fingerprint": ds.fingerprint}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def check_same_data(ds: Dataset) -> None:
    """Every rank must have encoded the same data with the same schema (else the shards are wrong)."""
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, _schema_digest(ds))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the encoded data / feature schema: {digests}")


def _eval_net(net: MultiTaskNet, device: torch.device) -> MultiTaskNet:
    """Evaluation code works on CPU tensors: use a CPU copy of a GPU model."""
    return net if device.type == "cpu" else copy.deepcopy(net).cpu()


def fit_distributed(cfg: Config, ds: Dataset, env: DistEnv) -> TrainResult:
    """``model.train.fit`` as one rank of a data-parallel job. Every rank returns a TrainResult; only
    rank 0's has the validation history, the test metrics and the best epoch's weights."""
    tc, W, rank, device = cfg.train, env.world_size, env.rank, env.device
    check_supported(cfg, W)
    # the same seeding and construction order as fit(): same init, same permutations
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    net = build_model(cfg.model, ds.schema, cfg.tasks)
    info: dict[str, Any] = {}
    if tc.reset_heads:
        net.reset_heads()
    if tc.freeze:
        info["frozen_parameters"] = freeze(net, tc.freeze)
    if rank > 0:  # dropout masks differ per rank; rank 0 keeps the single-process stream
        torch.manual_seed(int(np.random.SeedSequence([tc.seed, rank]).generate_state(1)[0]))
    net.to(device)
    weighting = make_weighting(tc, cfg.tasks).to(device)
    ddp = DistributedDataParallel(
        _WithShared(net), device_ids=[env.local_rank] if device.type == "cuda" else None
    )
    opt = make_optimizer(net, weighting, cfg)
    extra = weighting.extra_parameters()
    stopper = EarlyStopping(*resolve_monitor(cfg, ds), tc.patience)
    history: list[dict[str, float]] = []
    n = len(ds.train)
    B, b = tc.batch_size, tc.batch_size // W  # global and per-rank batch
    steps_per_epoch = math.ceil(math.ceil(n / W) / b)  # == ceil(n / B): the single-process count
    row_counts = embedding_row_counts(net, ds.train.cats)  # (R,) for the served unknown rows
    cats, nums, labels = (torch.from_numpy(a) for a in (ds.train.cats, ds.train.nums, ds.train.labels))
    bias = torch.from_numpy(ds.train.bias) if ds.train.bias is not None else None
    train_time, seen, global_step = 0.0, 0, 0
    step_log: list[dict[str, float]] = []
    for epoch in range(1, tc.epochs + 1):
        ddp.train()  # type: ignore[no-untyped-call]
        perm = rng.permutation(n)
        shard = rank_shard(perm, rank, W)
        t0 = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        # the epoch's step-log records: weights are global; the losses are this rank's share of the
        # global batch's (scaled), summed over ranks once per epoch rather than all-reduced per step
        logged: list[tuple[int, dict[str, float]]] = []
        logged_losses: list[list[float]] = []
        for step in range(steps_per_epoch):
            local = shard[step * b : (step + 1) * b]
            real = local >= 0
            idx = torch.from_numpy(np.where(real, local, 0))
            y = labels[idx]
            if not real.all():
                y[torch.from_numpy(~real)] = float("nan")  # padding: forward pass, no loss
            global_y = labels[torch.from_numpy(perm[step * B : (step + 1) * B])]
            scale = global_loss_scale(y, global_y, W)
            batch_bias = None if bias is None else bias[idx].to(device)
            out, z = ddp(cats[idx].to(device), nums[idx].to(device), batch_bias)
            raw = task_losses(out, y.to(device), cfg.tasks)
            losses = {t.name: raw[t.name] * scale[i].item() for i, t in enumerate(cfg.tasks)}
            opt.zero_grad(set_to_none=True)
            labelled = observed_tasks(global_y)  # the global batch's tasks with labels
            # DDP all-reduces net's gradients
            loss_value = float(weighting.backward(losses, z, net, labelled))
            for p in extra:  # uncertainty's s_i live outside the DDP module
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(W)
            # identical on every rank: its local gradient is already the mean (none if all frozen)
            if tc.tower_l2 > 0 and (tie := tower_l2_penalty(net)).requires_grad:
                penalty = tc.tower_l2 * tie
                penalty.backward()  # type: ignore[no-untyped-call]
                loss_value += float(penalty.detach())
            opt.step()
            weighting.after_step()
            sums["train/loss"] += loss_value
            for k, loss in losses.items():
                sums[f"train/{k}/loss"] += float(loss.detach())
            for k, w in weighting.weights().items():
                sums[f"weight/{k}"] += w
            for k, x in weighting.stats().items():
                sums[k] += x
            global_step += 1
            if tc.log_every and global_step % tc.log_every == 0:
                logged.append((global_step, {f"weight/{k}": w for k, w in weighting.weights().items()}))
                logged_losses.append([loss_value, *(float(losses[t.name].detach()) for t in cfg.tasks)])
        if logged:
            local_losses = torch.tensor(logged_losses, dtype=torch.float64, device=device)  # (S, 1 + T)
            dist.all_reduce(local_losses)
            for (s, weights), (loss, *task) in zip(logged, (local_losses / W).tolist(), strict=True):
                per_task = {f"{t.name}/loss": v for t, v in zip(cfg.tasks, task, strict=True)}
                step_log.append({"step": s, "epoch": epoch, "loss": loss, **per_task, **weights})
        # per-rank sums of scaled losses average to the global-batch values
        keys = sorted(sums)
        total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        train_time += time.perf_counter() - t0
        seen += n
        row: dict[str, float] = {"epoch": epoch}
        row.update({k: float(v) / W / steps_per_epoch for k, v in zip(keys, total.tolist(), strict=True)})
        decision = [False]
        if rank == 0:
            split = ds.valid if len(ds.valid) else ds.train
            prefix = "valid/" if len(ds.valid) else "train/"
            evaluated = _eval_net(net, device)
            with unknown_rows_imputed(evaluated, row_counts):  # validate the model as it will be served
                row.update(evaluate_split(evaluated, split, cfg.tasks, prefix, tc.eval_batch_size))
            decision = [stopper.update(epoch, row.get(stopper.monitor, float("nan")), net)]
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        history.append(row)
        dist.broadcast_object_list(decision, src=0)  # every rank stops at the same epoch
        if decision[0]:
            break

    sps = seen / train_time if train_time > 0 else 0.0
    metrics: dict[str, Any] = {}
    if rank == 0:
        if tc.restore_best:
            stopper.restore(net)
        net.eval()
        info["unknown_rows_imputed"] = impute_unknown_rows(net, row_counts)
        final = _eval_net(net, device)
        metrics = stopper.metrics()
        metrics.update(evaluate_split(final, ds.test, cfg.tasks, "test/", tc.eval_batch_size))
        metrics["weighting"] = tc.weighting
        metrics["task_weights"] = {k: round(v, 6) for k, v in weighting.weights().items()}
        metrics.update(info)
        util = expert_utilization(final, ds.test)
        if util is not None:
            metrics["expert_utilization"] = util
        metrics["train_samples_per_sec"] = round(sps, 1)  # global: all ranks' rows per second
        metrics["distributed"] = {"world_size": W, "backend": env.backend, "per_rank_batch_size": b}
    return TrainResult(
        net.cpu() if rank == 0 else net, metrics, history, stopper.best_epoch, sps, steps=step_log
    )


def train_distributed(cfg: Config, artifacts: str | Path | None = None) -> TrainResult:
    """One rank of ``torchrun -m model.train``: join the group, load data, fit; rank 0 writes the
    checkpoint (and moves LATEST); barrier; leave the group."""
    check_supported(cfg, launched_world_size())  # before joining: every rank fails the same way
    env = init_distributed()
    try:
        t0 = time.perf_counter()
        ds = load_dataset(cfg)
        check_same_data(ds)
        log.info("data loaded in %.1fs", time.perf_counter() - t0)
        result = fit_distributed(cfg, ds, env)
        if env.rank == 0 and artifacts is not None:
            save_result(artifacts, result, cfg, ds)
        dist.barrier(device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    finally:
        dist.destroy_process_group()
    return result
