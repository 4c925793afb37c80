"""Data-parallel training under ``torchrun``: the replica strategy of the one training loop.

``python -m model.train`` (``model.train.main``) started by ``torchrun`` (``WORLD_SIZE`` > 1,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``; several nodes with ``--nnodes``) calls
``train_distributed``: each process joins the group (gloo on CPU, NCCL with one GPU per
``LOCAL_RANK``) and runs the same ``model.train.train`` as one process, with a
``DistributedReplica``:

- **Data.** Rank r prepares and reads only the log fragments i with i % world_size == r (a
  Parquet row group or a CSV file; ``model.data``); vocabularies, statistics, duplicates and
  split boundaries are merged over ranks in fragment order, so every rank fits the same schema
  as one process would. Rank r trains on stream r (``train.streams`` = world size); a rank whose
  stream runs out takes part in the remaining steps with a padding row that carries no loss.
- **Gradients.** Each rank's task losses are scaled to its share of the global batch's (one
  all-reduce of the T label counts per step); after the local backward every gradient is averaged
  over ranks (dense ones by all-reduce, sparse embedding gradients by gathering their rows), so
  every rank takes the same step as one process over the union of the ranks' batches. Weighting
  schemes whose weights depend on the losses or gradients (worst case, GradNorm, MGDA, PCGrad)
  take those of the global batch from the replica.
- **Evaluation.** Every rank scores its own validation / test rows; rank 0 gathers them for the
  metrics (AUC, GAUC and NDCG need the merged rows) and broadcasts the early-stopping value; rank
  0 alone writes the checkpoint and LATEST.

A one-process run with ``train.streams`` = N reproduces an N-rank run step for step (same batches,
same gradients up to float summation order): that is what the tests compare. Dropout masks come
from a per-rank seed (rank 0 keeps the one-process stream), so they are the one thing that
differs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from model.checkpoint import Checkpoint
from model.config import Config, ConfigError
from model.replica import Replica
from model.train import TrainResult, train

log = logging.getLogger(__name__)

T = TypeVar("T")
# a collective waiting longer than this fails instead of hanging (rank 0 computes the metrics of
# the merged validation / test rows while the others wait)
TIMEOUT = dt.timedelta(minutes=float(os.environ.get("MTRANK_DIST_TIMEOUT_MIN", "60")))


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_supported(cfg: Config, world_size: int) -> None:
    """Raise ConfigError for a config that cannot run on ``world_size`` ranks."""
    tc = cfg.train
    streams = tc.streams or world_size
    if streams != world_size:
        raise ConfigError(
            f"train.streams = {tc.streams}: under torchrun every rank reads one stream, so streams must "
            f"be 0 or the world size {world_size}"
        )
    if tc.batch_size % world_size != 0:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be divisible by the world size {world_size} "
            "(per-rank batch = batch_size / world size)"
        )
    if cfg.data.max_rows is not None:
        raise ConfigError("data.max_rows (the first N rows in file order) needs a single process")


class DistributedReplica(Replica):
    """This process's rank in a ``torch.distributed`` group."""

    def __init__(self, device: torch.device, backend: str) -> None:
        super().__init__(device)
        self.rank, self.world, self.backend = dist.get_rank(), dist.get_world_size(), backend

    def sum(self, t: Tensor) -> Tensor:
        out = t.to(self.device)
        dist.all_reduce(out)
        return out.to(t.device)

    def cat(self, t: Tensor) -> Tensor:
        """Tensors of different lengths (dim 0) concatenated in rank order on every rank."""
        n = torch.tensor([t.shape[0]], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)]).to(t.device)

    def average_grads(self, params: Sequence[Tensor]) -> None:
        dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
        if dense:
            flat = torch.cat([p.grad.reshape(-1) for p in dense]).to(self.device)  # type: ignore[union-attr]
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in dense:
                g = p.grad
                assert g is not None
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        for p in params:
            g = p.grad
            if g is None or not g.is_sparse:
                continue
            g = g.coalesce()
            rows = self.cat(g.indices()[0])  # the rows every rank touched, and their gradients
            values = self.cat(g.values()) / self.world
            p.grad = torch.sparse_coo_tensor(rows[None], values, p.shape).coalesce()

    def broadcast(self, obj: T) -> T:
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0)
        out: T = box[0]
        return out

    def gather_to_root(self, obj: T) -> list[T] | None:
        return self.gather(obj, dst=0)

    def gather(self, obj: T, dst: int) -> list[T] | None:
        out: list[Any] | None = [None] * self.world if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def all_gather(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


def init_distributed() -> DistributedReplica:
    """Join the process group torchrun described in the environment (env:// rendezvous)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    replica = DistributedReplica(device, backend)
    log.info("rank %d of %d (local %d), backend %s", replica.rank, replica.world, local_rank, backend)
    return replica


def train_distributed(
    cfg: Config,
    artifacts: str | Path | None = None,
    *,
    init_from: str | Path | Checkpoint | None = None,
    resume: bool = False,
    force: bool = False,
) -> TrainResult:
    """One rank of ``torchrun -m model.train``: join the group, prepare this rank's data, fit;
    rank 0 writes the checkpoint (and moves LATEST); leave the group."""
    check_supported(cfg, launched_world_size())  # before joining: every rank fails the same way
    replica = init_distributed()
    try:
        return train(cfg, artifacts, replica=replica, init_from=init_from, resume=resume, force=force)
    finally:
        dist.destroy_process_group()
