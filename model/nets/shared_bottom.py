"""``SharedBottom``: shared embeddings + shared bottom MLP, one tower per task (Caruana 1997).

Example: two categorical columns (10 and 20 embedding rows) and one numeric column, two tasks.

    >>> import torch
    >>> from model.nets.shared_bottom import SharedBottom
    >>> net = SharedBottom([10, 20], 1, ["click", "like"], embed_dim=4, tower_dims=[4], dropout=0.1,
    ...     bottom_dims=[16])
    >>> net.embed.out_dim, net.bottom(torch.randn(3, 9)).shape  # D = 2 x 4 embedded + 1 numeric; (B, H)
    (9, torch.Size([3, 16]))
    >>> cats, nums = torch.tensor([[1, 5], [0, 19], [9, 0]]), torch.randn(3, 1)  # (B, C), (B, F)
    >>> {task: tuple(logit.shape) for task, logit in net(cats, nums).items()}  # {task: (B,)}
    {'click': (3,), 'like': (3,)}
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from model.nets.base import FeatureEmbedding, History, MultiTaskNet, SequenceLayout, Tower, linear_layers, mlp


class SharedBottom(MultiTaskNet):
    """embed (B, D) -> bottom MLP (B, H), computed once -> one tower per task (B,). The bottom's
    output is the shared representation z."""

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
        bottom_dims: Sequence[int],  # the shared bottom MLP, every task's tower reads its output
    ) -> None:
        super().__init__(tasks)
        self.embed = FeatureEmbedding(cards, n_nums, embed_dim, seqs)
        self.bottom, d_b = mlp(self.embed.out_dim, bottom_dims, dropout)
        self.towers = nn.ModuleDict({t: Tower(d_b, tower_dims, dropout) for t in tasks})
        self.n_bottom = len(bottom_dims)

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        h = self.bottom(self.embed(cats, nums, hist))  # (B, H)
        return {t: self.towers[t](h) for t in self.tasks}, h

    def first_layers(self) -> list[tuple[FeatureEmbedding, nn.Module]]:
        return [(self.embed, layer) for layer in linear_layers(self.bottom)[:1]]

    def above_first_layers(self, h: list[Tensor]) -> dict[str, Tensor]:
        bottom = self.bottom[1:](h[0])  # (B, H)
        return {t: self.towers[t](bottom) for t in self.tasks}

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
