"""``Conditioned``: ONE network for all tasks, told which task to predict by a learned task
embedding z_t (concatenated to / added to the input, or FiLM on every trunk layer).

Example: two categorical columns (10 and 20 embedding rows) and one numeric column, two tasks.

    >>> import torch
    >>> from model.nets.conditioned import Conditioned
    >>> net = Conditioned([10, 20], 1, ["click", "like"], embed_dim=4, tower_dims=[4], dropout=0.1,
    ...     bottom_dims=[16], conditioning="film", task_embed_dim=4)
    >>> cats, nums = torch.tensor([[1, 5], [0, 19], [9, 0]]), torch.randn(3, 1)  # (B, C), (B, F)
    >>> {task: tuple(logit.shape) for task, logit in net(cats, nums).items()}  # {task: (B,)}
    {'click': (3,), 'like': (3,)}
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import Conditioning
from model.nets.base import FeatureEmbedding, History, MultiTaskNet, SequenceLayout, Tower


class Conditioned(MultiTaskNet):
    """A single network f(x, z_t) for all tasks; z_t is a learned task embedding.

    conditioning = "concat": trunk input [x, z_t];  "add": trunk input x + z_t (z_t has the input's
    width); "film": h_l = (1 + gamma_l(z_t)) * (W_l h_{l-1} + b_l) + beta_l(z_t) on every trunk layer
    (Perez et al. 2018; gamma, beta start at 0, i.e. at the unconditioned network). The trunk and the
    head run once per task on a (T, B, .) batch; only z_t differs between tasks.
    """

    z_bounds_shared = False  # z is the embedding output; the shared trunk lies above it

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
        bottom_dims: Sequence[int],
        conditioning: Conditioning,
        task_embed_dim: int,
    ) -> None:
        super().__init__(tasks)
        self.conditioning = conditioning
        self.embed = FeatureEmbedding(cards, n_nums, embed_dim, seqs)
        d_x = self.embed.out_dim
        d_z = d_x if conditioning == "add" else task_embed_dim
        self.task_emb = nn.Parameter(0.1 * torch.randn(len(tasks), d_z))  # z_t, (T, Dz)
        dims = [d_x + d_z if conditioning == "concat" else d_x, *bottom_dims]
        self.trunk = nn.ModuleList([nn.Linear(a, b) for a, b in pairwise(dims)])
        self.film = nn.ModuleList(
            [nn.Linear(d_z, 2 * d) for d in bottom_dims] if conditioning == "film" else []
        )
        for layer in self.film:
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.dropout = nn.Dropout(dropout)
        self.head = Tower(dims[-1], tower_dims, dropout)

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        x = self.embed(cats, nums, hist)  # (B, D)
        T, (B, D) = len(self.tasks), x.shape
        z = self.task_emb  # (T, Dz)
        h = x.unsqueeze(0).expand(T, B, D)  # (T, B, D)
        if self.conditioning == "concat":
            h = torch.cat([h, z[:, None, :].expand(T, B, z.shape[1])], dim=-1)  # (T, B, D+Dz)
        elif self.conditioning == "add":
            h = h + z[:, None, :]  # (T, B, D)
        if not len(self.trunk):
            return self._above_first(h), x
        return self._above_first(self.trunk[0](h)), x  # (T, B, H1)

    def first_layers(self) -> list[tuple[FeatureEmbedding, nn.Module]]:
        return [(self.embed, self.trunk[0])] if len(self.trunk) else []

    def above_first_layers(self, h: list[Tensor]) -> dict[str, Tensor]:
        """h[0] is the first trunk layer's x share W_x x + b (B, H1) (concat: the z columns left
        out); the layer is affine in [x, z_t] (concat) or x + z_t (add), so the per-task z_t share
        (T, H1) is added here."""
        first, d_x, z = self.trunk[0], self.embed.out_dim, self.task_emb  # z: (T, Dz)
        assert isinstance(first, nn.Linear)
        x_share = h[0][None]  # (1, B, H1)
        if self.conditioning == "concat":
            pre = x_share + (z @ first.weight[:, d_x:].T)[:, None, :]  # (T, B, H1)
        elif self.conditioning == "add":
            pre = x_share + (z @ first.weight.T)[:, None, :]  # W (x + z_t) + b = (W x + b) + W z_t
        else:
            pre = x_share.expand(len(self.tasks), -1, -1)  # FiLM conditions after the layer
        return self._above_first(pre)

    def _above_first(self, h: Tensor) -> dict[str, Tensor]:
        """Everything after the first trunk layer's pre-activation h (T, B, H1); with no trunk, h
        is the trunk input."""
        z = self.task_emb
        for i, layer in enumerate(self.trunk):
            if i > 0:
                h = layer(h)  # (T, B, H)
            if self.conditioning == "film":
                gamma, beta = self.film[i](z).chunk(2, dim=-1)  # (T, H) each
                h = (1 + gamma[:, None, :]) * h + beta[:, None, :]
            h = self.dropout(F.relu(h))
        y = self.head(h)  # (T, B)
        return {t: y[i] for i, t in enumerate(self.tasks)}

    def shared_parameters(self) -> list[Tensor]:
        return [
            p for name, p in self.named_parameters() if name != "task_emb" and not name.startswith("bias")
        ]

    def last_shared_parameters(self) -> list[Tensor]:
        return [self.head.out.weight]

    def reset_heads(self) -> None:
        self.head.out.reset_parameters()
        with torch.no_grad():
            self.task_emb.normal_(std=0.1)
        if self.bias_tower is not None:
            self.bias_tower.out.reset_parameters()

    def layer_depths(self) -> list[tuple[int, list[nn.Parameter]]]:
        n = len(self.trunk)
        out = [(n + 1, [*self.embed.parameters()])]
        out += [(n - i, [*layer.parameters()]) for i, layer in enumerate(self.trunk)]
        out += [(n - i, [*layer.parameters()]) for i, layer in enumerate(self.film)]
        return out
