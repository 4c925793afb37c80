"""``MMoE``: shared embeddings, E expert MLPs, one softmax gate per task mixing the experts (Ma et
al. KDD 2018), optional expert dropout in the gates (Zhao et al. RecSys 2019).

Example: two categorical columns (10 and 20 embedding rows) and one numeric column, two tasks.

    >>> import torch
    >>> from model.nets.mmoe import MMoE
    >>> net = MMoE([10, 20], 1, ["click", "like"], embed_dim=4, tower_dims=[4], dropout=0.1,
    ...     n_experts=3, expert_dims=[8], gate_dropout=0.0)
    >>> cats, nums = torch.tensor([[1, 5], [0, 19], [9, 0]]), torch.randn(3, 1)  # (B, C), (B, F)
    >>> {task: tuple(logit.shape) for task, logit in net(cats, nums).items()}  # {task: (B,)}
    {'click': (3,), 'like': (3,)}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.nets.base import (
    FeatureEmbedding,
    History,
    MultiTaskNet,
    SequenceLayout,
    Tower,
    keep_at_least_one,
    split_columns,
)


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

    def layer_depths(self, top: int) -> list[tuple[int, list[nn.Parameter]]]:
        """Layer k (0 = first) is ``top - k`` layers from the output."""
        return [(top - k, [w, b]) for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True))]

    def forward(self, x: Tensor) -> Tensor:
        h: Tensor = torch.einsum("bd,edh->beh", x, self.weights[0]) + self.biases[0]  # (B, E, H1)
        return self.above_first(h)

    def above_first(self, h: Tensor) -> Tensor:
        """Everything after the first layer's pre-activation h (B, E, H1)."""
        h = self.dropout(F.relu(h))
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = self.dropout(F.relu(torch.einsum("beh,ehk->bek", h, w) + b))  # (B, E, Hk)
        return h

    def first_split(self, x_var: Tensor, x_const: Tensor, var_idx: Tensor, const_idx: Tensor) -> Tensor:
        """The first layer's pre-activation (B, E, H1), the request-constant part computed once."""
        w_var, w_const = split_columns(self.weights[0], var_idx, const_idx)  # (E, Dv, H1), (E, Dc, H1)
        const = torch.einsum("bd,edh->beh", x_const, w_const) + self.biases[0]  # (1, E, H1)
        h: Tensor = torch.einsum("bd,edh->beh", x_var, w_var) + const  # (B, E, H1)
        return h


class MMoE(MultiTaskNet):
    def __init__(
        self,
        cards: Sequence[int],
        n_nums: int,
        tasks: Sequence[str],
        seqs: Sequence[SequenceLayout] = (),
        *,
        embed_dim: int,
        tower_dims: Sequence[int],
        dropout: float,
        n_experts: int,
        expert_dims: Sequence[int],
        gate_dropout: float,
    ) -> None:
        super().__init__(tasks)
        self.n_experts = n_experts
        self.gate_dropout = gate_dropout
        self.embed = FeatureEmbedding(cards, n_nums, embed_dim, seqs)
        self.experts = Experts(n_experts, self.embed.out_dim, expert_dims, dropout)
        self.gates = nn.ModuleDict({t: nn.Linear(self.embed.out_dim, n_experts) for t in tasks})
        self.towers = nn.ModuleDict({t: Tower(self.experts.out_dim, tower_dims, dropout) for t in tasks})
        self.n_layers = len(expert_dims)

    def gate_probs(self, x: Tensor) -> dict[str, Tensor]:
        """Per-task softmax over experts, (B, E) each; expert dropout while training."""
        keep: Tensor | None = None
        if self.training and self.gate_dropout > 0:
            drawn = torch.rand(x.shape[0], self.n_experts, device=x.device)  # (B, E)
            keep = keep_at_least_one(drawn >= self.gate_dropout)
        out = {}
        for t in self.tasks:
            logits = self.gates[t](x)  # (B, E)
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            out[t] = torch.softmax(logits, dim=-1)
        return out

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        x = self.embed(cats, nums, hist)  # (B, D)
        h = self.experts(x)  # (B, E, H)
        # z: everything the task-specific part reads, the gates' input x and the experts' h
        z = torch.cat([x, h.flatten(1)], dim=1)  # (B, D + E*H)
        x, h = z[:, : x.shape[1]], z[:, x.shape[1] :].view_as(h)
        gates = self.gate_probs(x)
        return {t: self.towers[t](torch.einsum("be,beh->bh", gates[t], h)) for t in self.tasks}, z

    def first_layers(self) -> list[tuple[FeatureEmbedding, nn.Module]]:
        """The experts' first layer, then every task's gate."""
        return [(self.embed, m) for m in [self.experts, *self.gates.values()]] if self.n_layers else []

    def above_first_layers(self, h: list[Tensor]) -> dict[str, Tensor]:
        experts = self.experts.above_first(h[0])  # (B, E, H)
        gates = [torch.softmax(logits, dim=-1) for logits in h[1:]]  # T x (B, E)
        return {
            t: self.towers[t](torch.einsum("be,beh->bh", g, experts))
            for t, g in zip(self.tasks, gates, strict=True)
        }

    @torch.no_grad()
    def gate_weights(self, cats: Tensor, nums: Tensor, hist: History | None = None) -> Tensor:
        """Gate probabilities (B, T, E) in eval mode, for expert-utilisation statistics."""
        g = self.gate_probs(self.embed(cats, nums, hist))
        return torch.stack([g[t] for t in self.tasks], dim=1)

    def shared_parameters(self) -> list[Tensor]:
        return [*self.embed.parameters(), *self.experts.parameters()]

    def last_shared_parameters(self) -> list[Tensor]:
        return [self.experts.weights[-1]] if self.n_layers else [self.embed.emb.weight]

    def layer_depths(self) -> list[tuple[int, list[nn.Parameter]]]:
        n = self.n_layers
        return [
            (n + 1, [*self.embed.parameters()]),
            (1, [*self.gates.parameters()]),
            *self.experts.layer_depths(n),
        ]
