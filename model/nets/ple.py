"""``PLE``: Progressive Layered Extraction (Tang et al. RecSys 2020): levels of shared +
task-specific experts; a task's gate mixes its own and the shared experts, a shared gate mixes
all of them for the next level.

Example: two categorical columns (10 and 20 embedding rows) and one numeric column, two tasks.

    >>> import torch
    >>> from model.nets.ple import PLE
    >>> net = PLE([10, 20], 1, ["click", "like"], embed_dim=4, tower_dims=[4], dropout=0.1, levels=2,
    ...     n_shared_experts=2, n_task_experts=1, expert_dims=[8], gate_dropout=0.0)
    >>> cats, nums = torch.tensor([[1, 5], [0, 19], [9, 0]]), torch.randn(3, 1)  # (B, C), (B, F)
    >>> {task: tuple(logit.shape) for task, logit in net(cats, nums).items()}  # {task: (B,)}
    {'click': (3,), 'like': (3,)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from model.nets.base import FeatureEmbedding, History, MultiTaskNet, SequenceLayout, Tower, keep_at_least_one
from model.nets.mmoe import Experts


class PLELevel(nn.Module):
    """One extraction network of PLE (a CGC block).

    Experts at this level, in the order used for gate statistics: task 0's ``n_task`` experts,
    task 1's, ..., then the ``n_shared`` shared experts. Task t's gate mixes [its experts, shared
    experts]; below the last level a shared gate mixes all of them into the next level's shared
    input.
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[str],
        n_task: int,
        n_shared: int,
        expert_dims: Sequence[int],
        dropout: float,
        gate_dropout: float,
        last: bool,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.n_task, self.n_shared = n_task, n_shared
        self.gate_dropout = gate_dropout
        self.task_experts = nn.ModuleDict({t: Experts(n_task, in_dim, expert_dims, dropout) for t in tasks})
        self.shared_experts = Experts(n_shared, in_dim, expert_dims, dropout)
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, self.n_task + self.n_shared) for t in tasks})
        self.shared_gate = None if last else nn.Linear(in_dim, len(tasks) * self.n_task + self.n_shared)
        self.out_dim = self.shared_experts.out_dim

    @property
    def n_all(self) -> int:
        return len(self.tasks) * self.n_task + self.n_shared

    def _columns(self, t: int | None) -> list[int]:
        """Positions (in the level's expert order) a gate mixes: task t's + shared; all if None."""
        shared = list(range(len(self.tasks) * self.n_task, self.n_all))
        return (
            list(range(self.n_all))
            if t is None
            else [*range(t * self.n_task, (t + 1) * self.n_task), *shared]
        )

    def gate_probs(self, xs: Sequence[Tensor], x_shared: Tensor) -> dict[str, Tensor]:
        """Softmax of every gate over the experts it mixes: {task: (B, Et+Es), 'shared': (B, E_all)}."""
        keep: Tensor | None = None
        if self.training and self.gate_dropout > 0:
            keep = torch.rand(x_shared.shape[0], self.n_all, device=x_shared.device) >= self.gate_dropout
        gates: list[tuple[str, nn.Module, Tensor, int | None]] = [
            (t, self.gates[t], xs[i], i) for i, t in enumerate(self.tasks)
        ]
        if self.shared_gate is not None:
            gates.append(("shared", self.shared_gate, x_shared, None))
        out = {}
        for name, gate, x, t in gates:
            logits = gate(x)  # (B, n)
            if keep is not None:
                k = keep_at_least_one(keep[:, self._columns(t)])  # (B, n)
                logits = logits.masked_fill(~k, float("-inf"))
            out[name] = torch.softmax(logits, dim=-1)
        return out

    def forward(self, xs: Sequence[Tensor], x_shared: Tensor) -> tuple[list[Tensor], Tensor | None]:
        hs = self.shared_experts(x_shared)  # (B, Es, H)
        ht = [self.task_experts[t](xs[i]) for i, t in enumerate(self.tasks)]  # T x (B, Et, H)
        return self._mix(ht, hs, self.gate_probs(xs, x_shared))

    def first_layers(self) -> list[nn.Module]:
        """What reads the level's input x when every input is x (the first level): the shared
        experts, each task's experts, each task's gate, then the shared gate (if any)."""
        return [self.shared_experts, *self.task_experts.values(), *self._gate_layers().values()]

    def above_first(self, h: Sequence[Tensor]) -> tuple[list[Tensor], Tensor | None]:
        """Serving (eval): ``forward([x] * T, x)`` from ``first_layers``' pre-activations on x."""
        n = len(self.tasks)
        hs = self.shared_experts.above_first(h[0])  # (B, Es, H)
        ht = []  # T x (B, Et, H)
        for t, pre in zip(self.tasks, h[1 : n + 1], strict=True):
            experts = self.task_experts[t]
            assert isinstance(experts, Experts)
            ht.append(experts.above_first(pre))
        gates = zip(self._gate_layers(), h[n + 1 :], strict=True)
        return self._mix(ht, hs, {name: torch.softmax(logits, dim=-1) for name, logits in gates})

    def _gate_layers(self) -> dict[str, nn.Module]:
        """Every gate by name: each task's, then "shared" (below the last level)."""
        shared = {} if self.shared_gate is None else {"shared": self.shared_gate}
        return {**dict(self.gates.items()), **shared}

    def _mix(
        self, ht: Sequence[Tensor], hs: Tensor, g: Mapping[str, Tensor]
    ) -> tuple[list[Tensor], Tensor | None]:
        """Each task gate's mixture of [its experts, shared experts]; the shared gate's of all."""
        outs = [
            torch.einsum("be,beh->bh", g[t], torch.cat([ht[i], hs], dim=1))  # (B, H)
            for i, t in enumerate(self.tasks)
        ]
        shared = None
        if self.shared_gate is not None:
            shared = torch.einsum("be,beh->bh", g["shared"], torch.cat([*ht, hs], dim=1))  # (B, H)
        return outs, shared

    def full_gate_weights(self, xs: Sequence[Tensor], x_shared: Tensor) -> dict[str, Tensor]:
        """Every gate's probabilities spread over all experts of the level (0 where it cannot look)."""
        out = {}
        for name, p in self.gate_probs(xs, x_shared).items():
            t = None if name == "shared" else self.tasks.index(name)
            full = p.new_zeros(p.shape[0], self.n_all)  # (B, E_all)
            full[:, self._columns(t)] = p
            out[name] = full
        return out


class PLE(MultiTaskNet):
    z_bounds_shared = False  # z is the embedding output; the shared experts lie above it

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
        levels: int,
        n_shared_experts: int,
        n_task_experts: int,
        expert_dims: Sequence[int],
        gate_dropout: float,
    ) -> None:
        super().__init__(tasks)
        self.embed = FeatureEmbedding(cards, n_nums, embed_dim, seqs)
        blocks, d = [], self.embed.out_dim
        for k in range(levels):
            block = PLELevel(
                d,
                tasks,
                n_task_experts,
                n_shared_experts,
                expert_dims,
                dropout,
                gate_dropout,
                last=k == levels - 1,
            )
            blocks.append(block)
            d = block.out_dim
        self.levels = nn.ModuleList(blocks)
        self.towers = nn.ModuleDict({t: Tower(d, tower_dims, dropout) for t in tasks})
        self.n_layers = len(expert_dims)  # per level

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        x = self.embed(cats, nums, hist)  # (B, D)
        xs: list[Tensor] = [x] * len(self.tasks)
        x_shared: Tensor | None = x
        for level in self.level_list:
            assert x_shared is not None
            xs, x_shared = level(xs, x_shared)  # T x (B, H), (B, H) or None after the last level
        return {t: self.towers[t](xs[i]) for i, t in enumerate(self.tasks)}, x

    def first_layers(self) -> list[tuple[FeatureEmbedding, nn.Module]]:
        """The first level's experts and gates: only that level reads x itself."""
        return [(self.embed, m) for m in self.level_list[0].first_layers()] if self.n_layers else []

    def above_first_layers(self, h: list[Tensor]) -> dict[str, Tensor]:
        levels = self.level_list
        xs, x_shared = levels[0].above_first(h)
        for level in levels[1:]:
            assert x_shared is not None
            xs, x_shared = level(xs, x_shared)
        return {t: self.towers[t](xs[i]) for i, t in enumerate(self.tasks)}

    @property
    def level_list(self) -> list[PLELevel]:
        return [lv for lv in self.levels if isinstance(lv, PLELevel)]

    @torch.no_grad()
    def gate_weights_by_level(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> list[dict[str, Tensor]]:
        """Per level, every gate's probabilities over all the level's experts: {gate: (B, E_all)}."""
        x = self.embed(cats, nums, hist)
        xs: list[Tensor] = [x] * len(self.tasks)
        x_shared: Tensor | None = x
        out = []
        for level in self.level_list:
            assert x_shared is not None
            out.append(level.full_gate_weights(xs, x_shared))
            xs, x_shared = level(xs, x_shared)
        return out

    @torch.no_grad()
    def gate_weights(self, cats: Tensor, nums: Tensor, hist: History | None = None) -> Tensor:
        """Last level's task gates (B, T, E_all), like ``MMoE.gate_weights``."""
        g = self.gate_weights_by_level(cats, nums, hist)[-1]
        return torch.stack([g[t] for t in self.tasks], dim=1)

    def shared_parameters(self) -> list[Tensor]:
        # below the last level every expert reaches every task (through the next shared gate), and
        # so does a task gate whose output feeds a level that has a shared gate (all but the last two)
        levels = self.level_list
        params = [*self.embed.parameters()]
        for k, level in enumerate(levels[:-1]):
            params += [*level.task_experts.parameters(), *level.shared_experts.parameters()]
            params += [*level.shared_gate.parameters()] if level.shared_gate is not None else []
            params += [*level.gates.parameters()] if k < len(levels) - 2 else []
        return [*params, *levels[-1].shared_experts.parameters()]

    def last_shared_parameters(self) -> list[Tensor]:
        last = self.level_list[-1].shared_experts
        return [last.weights[-1]] if self.n_layers else [self.embed.emb.weight]

    def layer_depths(self) -> list[tuple[int, list[nn.Parameter]]]:
        n_levels, n = len(self.levels), self.n_layers
        out = [(n_levels * n + 1, [*self.embed.parameters()])]
        for k, level in enumerate(self.level_list):
            below = (n_levels - 1 - k) * n  # layers of the levels above this one
            gates = [*level.gates.parameters()]
            gates += [*level.shared_gate.parameters()] if level.shared_gate is not None else []
            out.append((below + 1, gates))
            for experts in [*level.task_experts.values(), level.shared_experts]:
                assert isinstance(experts, Experts)
                out += experts.layer_depths(below + n)
        return out
