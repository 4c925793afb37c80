"""``SeparateTowers``: one full network per task, no sharing at all (the no-transfer baseline).

Example: two categorical columns (10 and 20 embedding rows) and one numeric column, two tasks.

    >>> import torch
    >>> from model.nets.separate import SeparateTowers
    >>> net = SeparateTowers([10, 20], 1, ["click", "like"], embed_dim=4, tower_dims=[4], dropout=0.1,
    ...     bottom_dims=[16])
    >>> sorted(net.embed), net.shared_parameters()  # an embedding per task, nothing shared
    (['click', 'like'], [])
    >>> cats, nums = torch.tensor([[1, 5], [0, 19], [9, 0]]), torch.randn(3, 1)  # (B, C), (B, F)
    >>> {task: tuple(logit.shape) for task, logit in net(cats, nums).items()}  # {task: (B,)}
    {'click': (3,), 'like': (3,)}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from model.nets.base import FeatureEmbedding, History, MultiTaskNet, SequenceLayout, Tower, linear_layers, mlp


class SeparateTowers(MultiTaskNet):
    """Per task t: its own embedding (B, D), bottom MLP and tower -> (B,). z stacks the per-task
    embedding outputs, (B, T, D); no parameter is shared."""

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
        bottom_dims: Sequence[int],  # each task's own bottom MLP
    ) -> None:
        super().__init__(tasks)
        embeds = {t: FeatureEmbedding(cards, n_nums, embed_dim, seqs) for t in tasks}
        self.embed = nn.ModuleDict(embeds)
        d_in = embeds[tasks[0]].out_dim
        self.bottom = nn.ModuleDict({t: mlp(d_in, bottom_dims, dropout)[0] for t in tasks})
        d_b = bottom_dims[-1] if bottom_dims else d_in
        self.towers = nn.ModuleDict({t: Tower(d_b, tower_dims, dropout) for t in tasks})
        self.n_bottom = len(bottom_dims)

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        z = torch.stack([self.embed[t](cats, nums, hist) for t in self.tasks], dim=1)  # (B, T, D)
        out = {t: self.towers[t](self.bottom[t](z[:, i])) for i, t in enumerate(self.tasks)}
        return out, z

    def first_layers(self) -> list[tuple[FeatureEmbedding, nn.Module]]:
        """Each task's first bottom layer, on its own embedding."""
        if not self.n_bottom:
            return []
        embeds = self.feature_embeddings()  # one a task, in task order like the bottoms
        return [(e, linear_layers(b)[0]) for e, b in zip(embeds, self.bottom.values(), strict=True)]

    def above_first_layers(self, h: list[Tensor]) -> dict[str, Tensor]:
        out = {}
        for (t, bottom), first in zip(self.bottom.items(), h, strict=True):
            assert isinstance(bottom, nn.Sequential)
            out[t] = self.towers[t](bottom[1:](first))  # (B,)
        return out

    def task_towers(self) -> dict[str, nn.Module]:
        # nothing is shared, so the whole per-task network is the "tower" soft sharing ties together
        return {t: nn.ModuleList([self.embed[t], self.bottom[t], self.towers[t]]) for t in self.tasks}

    def layer_depths(self) -> list[tuple[int, list[nn.Parameter]]]:
        n = self.n_bottom
        out = [(n + 1, [*self.embed.parameters()])]
        for bottom in self.bottom.values():
            out += [(n - i, [*layer.parameters()]) for i, layer in enumerate(linear_layers(bottom))]
        return out
