"""What a training process needs to know about the others: the replica strategy of the one loop.

``Replica`` is one process (rank 0 of 1): every collective is the identity. ``model.distributed``
subclasses it for ``torchrun`` (data parallel over ranks). The training loop (``model.train.fit``)
calls only these methods, so single-process and data-parallel training are the same code:

- ``sum(t)``        -- a tensor summed over ranks (loss normalisation, weighting statistics);
- ``average_grads`` -- every parameter's gradient averaged over ranks (sparse ones by gathering
                       their rows), after the local backward;
- ``cat(t)``        -- tensors of different lengths concatenated over ranks (rows of a batch);
- ``gather(obj)``   -- Python objects gathered on rank 0 (evaluation rows);
- ``broadcast(obj)``-- rank 0's object on every rank;
- ``all_gather`` / ``barrier`` -- from ``model.data.Exchange`` (data preparation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from model.config import ConfigError
from model.data import Exchange

T = TypeVar("T")


class Replica(Exchange):
    """One process: rank 0 of a world of 1."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, t: Tensor) -> Tensor:
        return t

    def average_grads(self, params: Sequence[Tensor]) -> None:
        pass

    def cat(self, t: Tensor) -> Tensor:
        return t

    def broadcast(self, obj: T) -> T:
        return obj

    def gather_to_root(self, obj: T) -> list[T] | None:
        return [obj]


def resolve_device(name: str) -> torch.device:
    """``train.device``: "auto" (a GPU when one is present), "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device = {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}, but no CUDA device is available")
    return dev
