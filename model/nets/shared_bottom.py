"""``SharedBottom``: shared embeddings + shared bottom MLP, one tower per task (Caruana 1997).

Example: two categorical columns (10 and 20 embedding rows) and one numeric column, two tasks.

    >>> import torch
    >>> from model.config import ModelConfig
    >>> from model.nets.shared_bottom import SharedBottom
    >>> cfg = ModelConfig(arch="shared_bottom", embed_dim=4, bottom_dims=[16], tower_dims=[4])
    >>> net = SharedBottom(cfg, cards=[10, 20], n_nums=1, tasks=["click", "like"])
    >>> cats, nums = torch.tensor([[1, 5], [0, 19], [9, 0]]), torch.randn(3, 1)  # (B, C), (B, F)
    >>> {task: tuple(logit.shape) for task, logit in net(cats, nums).items()}  # {task: (B,)}
    {'click': (3,), 'like': (3,)}
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from model.config import ModelConfig
from model.nets.base import (
    FeatureEmbedding,
    History,
    MultiTaskNet,
    RequestBatch,
    SequenceLayout,
    Tower,
    linear_layers,
    mlp,
    split_linear,
)


class SharedBottom(MultiTaskNet):
    def __init__(
        self,
        cfg: ModelConfig,
        cards: Sequence[int],
        n_nums: int,
        tasks: Sequence[str],
        seqs: Sequence[SequenceLayout] = (),
    ) -> None:
        super().__init__(tasks)
        self.embed = FeatureEmbedding(cards, n_nums, cfg.embed_dim, seqs)
        self.bottom, d_b = mlp(self.embed.out_dim, cfg.bottom_dims, cfg.dropout)
        self.towers = nn.ModuleDict({t: Tower(d_b, cfg.tower_dims, cfg.dropout) for t in tasks})
        self.n_bottom = len(cfg.bottom_dims)

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        h = self.bottom(self.embed(cats, nums, hist))  # (B, H)
        return {t: self.towers[t](h) for t in self.tasks}, h

    def request_tasks(self, r: RequestBatch) -> dict[str, Tensor]:
        if not len(self.bottom):
            return super().request_tasks(r)
        first = self.bottom[0]
        assert isinstance(first, nn.Linear)
        h = self.bottom[1:](split_linear(*self.embed.split(r), first))  # (B, H)
        return {t: self.towers[t](h) for t in self.tasks}

    def shared_parameters(self) -> list[Tensor]:
        return [*self.embed.parameters(), *self.bottom.parameters()]

    def last_shared_parameters(self) -> list[Tensor]:
        linears = [m for m in self.bottom if isinstance(m, nn.Linear)]
        return [linears[-1].weight] if linears else [self.embed.emb.weight]

    def layer_depths(self) -> list[tuple[int, list[nn.Parameter]]]:
        n = self.n_bottom
        out = [(n + 1, [*self.embed.parameters()])]
        out += [(n - i, [*layer.parameters()]) for i, layer in enumerate(linear_layers(self.bottom))]
        return out
