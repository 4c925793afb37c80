"""Multi-task ranking networks, readable top to bottom.

Every network maps a batch of encoded features to a dict of per-task outputs:

    cats (B, C) int64 embedding indices, nums (B, F) float32  ->  {task: (B,) logit or value}

Binary heads return logits, regression heads return the prediction in the (transformed) label
space. Losses and task weighting live outside ``forward()`` (see ``model.train``).

- ``SeparateTowers``: one full network per task, no sharing at all (the no-transfer baseline).
- ``SharedBottom``:   shared embeddings + shared bottom MLP, one tower per task (Caruana 1997).
- ``MMoE``:           shared embeddings, E expert MLPs, one softmax gate per task mixing the
                      experts (Ma et al. KDD 2018), optional expert dropout in the gates (Zhao et
                      al. RecSys 2019) against gate polarisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig, TaskConfig
from model.features import FeatureSchema


def mlp(in_dim: int, dims: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Linear -> ReLU -> Dropout stack; returns the module and its output width."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = d
    return nn.Sequential(*layers), in_dim


class FeatureEmbedding(nn.Module):
    """All categorical features share one embedding matrix, each field with its own row range."""

    offsets: Tensor

    def __init__(self, cardinalities: Sequence[int], n_nums: int, embed_dim: int) -> None:
        super().__init__()
        offsets = (
            torch.tensor([0, *cardinalities[:-1]], dtype=torch.long).cumsum(0) if cardinalities else None
        )
        self.register_buffer("offsets", offsets if offsets is not None else torch.zeros(0, dtype=torch.long))
        self.emb = nn.Embedding(max(sum(cardinalities), 1), embed_dim)
        nn.init.normal_(self.emb.weight, std=0.05)
        self.out_dim = len(cardinalities) * embed_dim + n_nums

    def forward(self, cats: Tensor, nums: Tensor) -> Tensor:
        e = self.emb(cats + self.offsets)  # (B, C, D)
        return torch.cat([e.flatten(1), nums], dim=1)  # (B, C*D + F)


class Tower(nn.Module):
    """Task-specific MLP ending in one output unit."""

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.body, out = mlp(in_dim, dims, dropout)
        self.out = nn.Linear(out, 1)

    def forward(self, h: Tensor) -> Tensor:
        y: Tensor = self.out(self.body(h)).squeeze(-1)  # (B,)
        return y


class MultiTaskNet(nn.Module):
    """Base class: knows its task names; ``forward`` returns ``{task: (B,)}``."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)


class SeparateTowers(MultiTaskNet):
    def __init__(self, cfg: ModelConfig, cards: Sequence[int], n_nums: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.embed = nn.ModuleDict({t: FeatureEmbedding(cards, n_nums, cfg.embed_dim) for t in tasks})
        d_in = len(cards) * cfg.embed_dim + n_nums
        self.bottom = nn.ModuleDict({t: mlp(d_in, cfg.bottom_dims, cfg.dropout)[0] for t in tasks})
        d_b = cfg.bottom_dims[-1] if cfg.bottom_dims else d_in
        self.towers = nn.ModuleDict({t: Tower(d_b, cfg.tower_dims, cfg.dropout) for t in tasks})

    def forward(self, cats: Tensor, nums: Tensor) -> dict[str, Tensor]:
        return {t: self.towers[t](self.bottom[t](self.embed[t](cats, nums))) for t in self.tasks}


class SharedBottom(MultiTaskNet):
    def __init__(self, cfg: ModelConfig, cards: Sequence[int], n_nums: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.embed = FeatureEmbedding(cards, n_nums, cfg.embed_dim)
        self.bottom, d_b = mlp(self.embed.out_dim, cfg.bottom_dims, cfg.dropout)
        self.towers = nn.ModuleDict({t: Tower(d_b, cfg.tower_dims, cfg.dropout) for t in tasks})

    def forward(self, cats: Tensor, nums: Tensor) -> dict[str, Tensor]:
        h = self.bottom(self.embed(cats, nums))  # (B, H)
        return {t: self.towers[t](h) for t in self.tasks}


class Experts(nn.Module):
    """E independent MLPs evaluated together: one batched matmul per layer."""

    def __init__(self, n_experts: int, in_dim: int, dims: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d in dims:
            w = torch.empty(n_experts, in_dim, d)
            for e in range(n_experts):  # same init as nn.Linear, per expert
                nn.init.kaiming_uniform_(w[e].T, a=5**0.5)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n_experts, d)))
            in_dim = d
        self.dropout = nn.Dropout(dropout)
        self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        h: Tensor = torch.einsum("bd,edh->beh", x, self.weights[0]) + self.biases[0]  # (B, E, H1)
        h = self.dropout(F.relu(h))
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = self.dropout(F.relu(torch.einsum("beh,ehk->bek", h, w) + b))  # (B, E, Hk)
        return h


class MMoE(MultiTaskNet):
    def __init__(self, cfg: ModelConfig, cards: Sequence[int], n_nums: int, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.n_experts = cfg.n_experts
        self.gate_dropout = cfg.gate_dropout
        self.embed = FeatureEmbedding(cards, n_nums, cfg.embed_dim)
        self.experts = Experts(cfg.n_experts, self.embed.out_dim, cfg.expert_dims, cfg.dropout)
        self.gates = nn.ModuleDict({t: nn.Linear(self.embed.out_dim, cfg.n_experts) for t in tasks})
        self.towers = nn.ModuleDict(
            {t: Tower(self.experts.out_dim, cfg.tower_dims, cfg.dropout) for t in tasks}
        )

    def gate_probs(self, x: Tensor) -> dict[str, Tensor]:
        """Per-task softmax over experts, (B, E) each; expert dropout while training."""
        keep: Tensor | None = None
        if self.training and self.gate_dropout > 0:
            B, E = x.shape[0], self.n_experts
            keep = torch.rand(B, E, device=x.device) >= self.gate_dropout  # (B, E)
            fallback = F.one_hot(torch.randint(E, (B,), device=x.device), E).bool()
            keep = torch.where(keep.any(dim=1, keepdim=True), keep, fallback)  # never drop all experts
        out = {}
        for t in self.tasks:
            logits = self.gates[t](x)  # (B, E)
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            out[t] = torch.softmax(logits, dim=-1)
        return out

    def forward(self, cats: Tensor, nums: Tensor) -> dict[str, Tensor]:
        x = self.embed(cats, nums)  # (B, D)
        h = self.experts(x)  # (B, E, H)
        gates = self.gate_probs(x)
        return {t: self.towers[t](torch.einsum("be,beh->bh", gates[t], h)) for t in self.tasks}

    @torch.no_grad()
    def gate_weights(self, cats: Tensor, nums: Tensor) -> Tensor:
        """Gate probabilities (B, T, E) in eval mode, for expert-utilisation statistics."""
        g = self.gate_probs(self.embed(cats, nums))
        return torch.stack([g[t] for t in self.tasks], dim=1)


ARCHS: dict[str, Callable[[ModelConfig, Sequence[int], int, Sequence[str]], MultiTaskNet]] = {
    "separate": SeparateTowers,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
}


def build_model(cfg: ModelConfig, schema: FeatureSchema, tasks: Sequence[TaskConfig]) -> MultiTaskNet:
    cards = [f.cardinality for f in schema.cats()]
    return ARCHS[cfg.arch](cfg, cards, schema.n_nums, [t.name for t in tasks])
