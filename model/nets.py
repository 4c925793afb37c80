"""Multi-task ranking networks, readable top to bottom.

Every network maps a batch of encoded features to a dict of per-task outputs:

    cats (B, C) int64 embedding indices, nums (B, F) float32  ->  {task: (B,) logit or value}

Binary heads return logits, regression heads return the prediction in the (transformed) label
space. Losses and task weighting live outside ``forward()`` (see ``model.train`` and
``model.weighting``).

- ``SeparateTowers``: one full network per task, no sharing at all (the no-transfer baseline).
- ``SharedBottom``:   shared embeddings + shared bottom MLP, one tower per task (Caruana 1997).
- ``MMoE``:           shared embeddings, E expert MLPs, one softmax gate per task mixing the
                      experts (Ma et al. KDD 2018), optional expert dropout in the gates (Zhao et
                      al. RecSys 2019) against gate polarisation.
- ``PLE``:            Progressive Layered Extraction (Tang et al. RecSys 2020): levels of shared +
                      task-specific experts; a task's gate mixes its own and the shared experts, a
                      shared gate mixes all of them for the next level.
- ``Conditioned``:    ONE network for all tasks, told which task to predict by a learned task
                      embedding z_t (concatenated to / added to the input, or FiLM on every trunk
                      layer); the trunk runs once per task.

Hooks the multi-task machinery outside ``forward()`` uses (every arch implements them):

- ``forward_with_shared`` also returns the *shared representation* z: the tensor every task's
  output is computed from (shared-bottom output; for MMoE the embedding output the gates read
  and the expert outputs, side by side; the embedding output for PLE and Conditioned; the
  per-task embedding outputs stacked (B, T, D) for SeparateTowers). MGDA-UB differentiates the
  task losses w.r.t. z, which bounds the shared parameters' gradient only when all of them lie
  below z (``z_bounds_shared``); PLE's and Conditioned's shared experts / trunk lie above it.
- ``shared_parameters()``: parameters more than one task's loss depends on (PCGrad);
  ``last_shared_parameters()``: the last shared layer's weight (GradNorm's W).
- ``task_towers()``: per-task modules with corresponding parameters (soft parameter sharing).
- ``param_depths()``: layers below the heads (layer-wise LR decay); ``reset_heads()``.

Selection bias (YouTube, Zhao et al. 2019): ``bias_tower`` is a shallow tower on logged position x
device whose logit is added to the ``bias_tasks``' logits. Training rows carry the logged bias
features (with feature dropout to "unknown"); evaluation and serving have none, and get the tower's
output for all-unknown features, the value the paper's "treat position as missing" means -- so the
tower's and the main network's shares of the intercept do not matter at serving.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from model.config import ModelConfig, TaskConfig
from model.features import FeatureSchema


def mlp(in_dim: int, dims: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Linear -> ReLU -> Dropout stack; returns the module and its output width."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = d
    return nn.Sequential(*layers), in_dim


History = Mapping[str, tuple[Tensor, Tensor]]  # sequence -> (items (B, L, K) long, lengths (B,) long)


@dataclass
class RequestBatch:
    """One ranking request, encoded per group: the user and context rows (1 row each) are the same
    for all B candidates, so the networks can compute their share of the first layer once. The
    user's histories (one row per sequence) are per request too."""

    user_cats: Tensor  # (1, Cu)
    video_cats: Tensor  # (B, Cv)
    context_cats: Tensor  # (1, Cc)
    user_nums: Tensor  # (1, Fu)
    video_nums: Tensor  # (B, Fv)
    context_nums: Tensor  # (1, Fc)
    history: History | None = None  # sequence -> (items (1, L, K), lengths (1,))

    def full(self) -> tuple[Tensor, Tensor]:
        """Broadcast to the model's (B, C) / (B, F) inputs, group-major like the schema."""
        b = self.video_cats.shape[0]
        cats = [self.user_cats.expand(b, -1), self.video_cats, self.context_cats.expand(b, -1)]
        nums = [self.user_nums.expand(b, -1), self.video_nums, self.context_nums.expand(b, -1)]
        return torch.cat(cats, dim=1), torch.cat(nums, dim=1)

    def full_history(self) -> History | None:
        """The histories broadcast to the B candidates."""
        if self.history is None:
            return None
        b = self.video_cats.shape[0]
        return {k: (v.expand(b, -1, -1), n.expand(b)) for k, (v, n) in self.history.items()}


@dataclass(frozen=True)
class SequenceLayout:
    """A sequence feature as the network sees it: its items' columns in ``cats`` (the video key
    feature's and the side features'), whose embedding rows the history items share."""

    name: str
    pooling: str  # "attention" | "mean"
    max_len: int
    cols: list[int]


class TargetAttention(nn.Module):
    """Softmax attention of a candidate over its user's history (DIN's target attention, with a
    scaled bilinear score instead of DIN's MLP, so the history's keys are computed once per request):

        w_j = softmax_j( (W_q q) . (W_k h_j) / sqrt(D) ),  pooled = sum_j w_j h_j

    over the valid items plus a learned "nothing" slot whose value is 0, so an empty history pools
    to 0 and a user's history can weigh little for a candidate it says nothing about."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.null = nn.Parameter(torch.zeros(1))
        self.scale = dim**-0.5

    def forward(self, q: Tensor, h: Tensor, mask: Tensor) -> Tensor:
        """q (B, D) targets, h (b, L, D) items and mask (b, L) with b = B or 1 -> (B, D)."""
        k = self.key(h)  # (b, L, D): once per request when b = 1
        s = (self.query(q)[:, None, :] @ k.transpose(1, 2)).squeeze(1) * self.scale  # (B, L)
        s = s.masked_fill(~mask, float("-inf"))
        s = torch.cat([s, self.null.expand(s.shape[0], 1)], dim=1)  # (B, L + 1)
        w = torch.softmax(s, dim=1)[:, None, :-1]  # (B, 1, L)
        out: Tensor = (w @ h).squeeze(1)  # (B, D)
        return out


class SequencePooling(nn.Module):
    """Pools each history into [pooled (D) | log1p(length) (1)]: items embedded with the shared
    table's rows of their features (summed over the item's features), the pooled vector by target
    attention against the candidate's same features or by their mean."""

    def __init__(self, layouts: Sequence[SequenceLayout], embed_dim: int, offsets: Tensor) -> None:
        super().__init__()
        self.layouts = list(layouts)
        self.dim = embed_dim
        for i, lay in enumerate(self.layouts):
            cols = torch.tensor(lay.cols, dtype=torch.long)
            self.register_buffer(f"cols{i}", cols)
            self.register_buffer(f"offsets{i}", offsets[cols].clone())
        self.attention = nn.ModuleDict(
            {lay.name: TargetAttention(embed_dim) for lay in self.layouts if lay.pooling == "attention"}
        )
        self.out_dim = len(self.layouts) * (embed_dim + 1)

    def blocks(self) -> list[tuple[int, int, bool]]:
        """(offset, width, varies per candidate) of each output block, in ``parts``' order."""
        out = []
        for i, lay in enumerate(self.layouts):
            at = i * (self.dim + 1)
            out += [(at, self.dim, lay.pooling == "attention"), (at + self.dim, 1, False)]
        return out

    def parts(
        self, emb: nn.Embedding, e: Tensor, shift: int, hist: History | None, rows: int
    ) -> list[tuple[Tensor, int, bool]]:
        """(output block, its offset in the pooled output, whether it varies per candidate).

        ``e`` (B, C', D) holds the candidates' embeddings of the columns from ``shift`` on (all
        columns in training; the video group's at serving); ``hist`` has ``rows`` rows (B, or 1
        for a request: then everything but the attention-pooled vector is one row).
        """
        out: list[tuple[Tensor, int, bool]] = []
        for i, lay in enumerate(self.layouts):
            cols, offsets = getattr(self, f"cols{i}"), getattr(self, f"offsets{i}")
            got = hist.get(lay.name) if hist is not None else None
            if got is None:  # no history given: an empty one
                items = torch.zeros(rows, lay.max_len, len(lay.cols), dtype=torch.long, device=e.device)
                lens = torch.zeros(rows, dtype=torch.long, device=e.device)
            else:
                items, lens = got
            h = emb(items + offsets).sum(dim=2)  # (b, L, D)
            mask = torch.arange(items.shape[1], device=e.device)[None, :] < lens[:, None]  # (b, L)
            at = i * (self.dim + 1)
            if lay.pooling == "attention":
                q = e[:, cols - shift].sum(dim=1)  # (B, D): the candidate's own item features
                out.append((self.attention[lay.name](q, h, mask), at, True))
            else:
                mean = (h * mask[..., None]).sum(dim=1) / lens.clamp(min=1)[:, None]  # (b, D)
                out.append((mean, at, False))
            out.append((torch.log1p(lens.float())[:, None], at + self.dim, False))
        return out


class FeatureEmbedding(nn.Module):
    """All categorical features share one embedding matrix, each field with its own row range;
    history items (``SequencePooling``) look up the rows of their features in the same matrix."""

    offsets: Tensor

    def __init__(
        self,
        cardinalities: Sequence[int],
        n_nums: int,
        embed_dim: int,
        sequences: Sequence[SequenceLayout] = (),
    ) -> None:
        super().__init__()
        offsets = (
            torch.tensor([0, *cardinalities[:-1]], dtype=torch.long).cumsum(0) if cardinalities else None
        )
        self.register_buffer("offsets", offsets if offsets is not None else torch.zeros(0, dtype=torch.long))
        self.emb = nn.Embedding(max(sum(cardinalities), 1), embed_dim)
        nn.init.normal_(self.emb.weight, std=0.05)
        self.seq = SequencePooling(sequences, embed_dim, self.offsets) if sequences else None
        self.out_dim = len(cardinalities) * embed_dim + n_nums + (self.seq.out_dim if self.seq else 0)
        self._split_indices: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def forward(self, cats: Tensor, nums: Tensor, hist: History | None = None) -> Tensor:
        e = self.emb(cats + self.offsets)  # (B, C, D)
        parts = [e.flatten(1), nums]  # (B, C*D + F)
        if self.seq is not None:  # + the pooled histories
            parts += [t for t, _, _ in self.seq.parts(self.emb, e, 0, hist, cats.shape[0])]
        return torch.cat(parts, dim=1)

    def split(self, r: RequestBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_var (B, Dv), x_const (1, Dc), their column indices in forward()'s x (Dv,), (Dc,)).

        forward()'s x is [e_user | e_video | e_context | n_user | n_video | n_context | histories];
        the video columns and the attention-pooled histories vary per candidate, the rest is one
        row per request (the history items are embedded once, their attention keys too).
        """
        cu, cv = r.user_cats.shape[1], r.video_cats.shape[1]
        fu, fv = r.user_nums.shape[1], r.video_nums.shape[1]
        off = self.offsets
        e_u = self.emb(r.user_cats + off[:cu]).flatten(1)  # (1, Cu*D)
        e_v3 = self.emb(r.video_cats + off[cu : cu + cv])  # (B, Cv, D)
        e_v = e_v3.flatten(1)  # (B, Cv*D)
        e_c = self.emb(r.context_cats + off[cu + cv :]).flatten(1)  # (1, Cc*D)
        var, const = [e_v, r.video_nums], [e_u, e_c, r.user_nums, r.context_nums]
        if self.seq is not None:  # the attention-pooled histories vary per candidate, the rest not
            for t, _, varies in self.seq.parts(self.emb, e_v3, cu, r.history, 1):
                (var if varies else const).append(t)
        var_idx, const_idx = self._split_index(e_u.shape[1], e_v.shape[1], e_c.shape[1], fu, fv)
        return torch.cat(var, dim=1), torch.cat(const, dim=1), var_idx, const_idx

    def _split_index(self, d_u: int, d_v: int, d_c: int, fu: int, fv: int) -> tuple[Tensor, Tensor]:
        """The varying and the constant columns of x; the same for every request of a model, so
        they are built once per shape (a new tensor per call would also defeat ``split_weight``)."""
        key = (d_u, d_v, d_c, fu, fv)
        cached = self._split_indices.get(key)
        if cached is None:
            d_cat = d_u + d_v + d_c
            idx = torch.arange(self.out_dim)
            base = self.out_dim - (self.seq.out_dim if self.seq is not None else 0)
            var_parts = [idx[d_u : d_u + d_v], idx[d_cat + fu : d_cat + fu + fv]]
            const_parts = [
                idx[:d_u],
                idx[d_u + d_v : d_cat],
                idx[d_cat : d_cat + fu],
                idx[d_cat + fu + fv : base],
            ]
            if self.seq is not None:  # in the order of SequencePooling.parts
                for at, width, varies in self.seq.blocks():
                    (var_parts if varies else const_parts).append(idx[base + at : base + at + width])
            cached = self._split_indices[key] = (torch.cat(var_parts), torch.cat(const_parts))
        return cached


def split_weight(w: Tensor, idx: Tensor, dim: int) -> Tensor:
    """``w.index_select(dim, idx)`` for serving, gathered once per weight and index and reused
    while the weight is unchanged (its version counter moves with every in-place update, e.g. an
    optimizer step). Without it every request gathered the same columns again."""
    cache: dict[tuple[int, int], tuple[int, Tensor, Tensor]] | None = _SPLIT_CACHE.get(w)
    if cache is None:
        cache = _SPLIT_CACHE[w] = {}
    # (a tensor made under inference_mode has no version counter; nothing trains it either)
    version = -1 if w.is_inference() else w._version
    hit = cache.get((id(idx), dim))
    if hit is not None and hit[0] == version and hit[1] is idx:
        return hit[2]
    with torch.no_grad():
        gathered = w.detach().index_select(dim, idx).contiguous()
    cache[(id(idx), dim)] = (version, idx, gathered)
    return gathered


# weight -> {(id(index), dim): (weight version, index, gathered)}, by the weight's identity and
# weakly: a dropped model frees its entries
_SPLIT_CACHE: Any = WeakIdKeyDictionary()


def split_linear(
    x_var: Tensor, x_const: Tensor, var_idx: Tensor, const_idx: Tensor, layer: nn.Linear
) -> Tensor:
    """layer(x) for x = x_var and x_const interleaved: the constant part is computed once."""
    w = layer.weight  # (H, D)
    if torch.is_grad_enabled() and w.requires_grad:  # training / autograd: gather as part of the graph
        w_const, w_var = w[:, const_idx], w[:, var_idx]
    else:
        w_const, w_var = split_weight(w, const_idx, 1), split_weight(w, var_idx, 1)
    const = x_const @ w_const.T + layer.bias  # (1, H)
    out: Tensor = x_var @ w_var.T + const  # (B, H)
    return out


class Tower(nn.Module):
    """Task-specific MLP ending in one output unit."""

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.body, out = mlp(in_dim, dims, dropout)
        self.out = nn.Linear(out, 1)

    def forward(self, h: Tensor) -> Tensor:
        y: Tensor = self.out(self.body(h)).squeeze(-1)  # (..., B)
        return y


class BiasTower(nn.Module):
    """Shallow tower on logged selection-bias features -> one additive logit per bias task.

    With probability ``feature_dropout`` a training row gets all its bias features set to the
    unknown index 0, so the main network cannot lean on the tower for every row (YouTube paper).
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        embed_dim: int,
        dims: Sequence[int],
        tasks: Sequence[str],
        p: float,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.n_features = len(cardinalities)
        self.feature_dropout = p
        self.embed = FeatureEmbedding(cardinalities, 0, embed_dim)
        self.body, d = mlp(self.embed.out_dim, dims, 0.0)
        self.out = nn.Linear(d, len(self.tasks))

    def forward(self, bias: Tensor, dropout: bool = True) -> Tensor:
        if dropout and self.training and self.feature_dropout > 0:
            drop = torch.rand(bias.shape[0], device=bias.device) < self.feature_dropout  # (B,)
            bias = bias.masked_fill(drop[:, None], 0)
        x = self.embed(bias, torch.zeros(bias.shape[0], 0, device=bias.device))  # (B, Cb*D)
        y: Tensor = self.out(self.body(x))  # (B, Tb)
        return y


class MultiTaskNet(nn.Module):
    """Base class: knows its task names; ``forward`` returns ``{task: (B,)}``.

    Subclasses implement ``forward_tasks`` (outputs + shared representation) and the parameter
    views; the bias tower is handled here, so every arch supports it.
    """

    bias_tower: BiasTower | None
    z_bounds_shared = True  # every shared parameter lies below z (MGDA-UB's requirement)

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.bias_tower = None  # attached by build_model when model.bias_features is set

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """({task: (B,)}, shared representation z)."""
        raise NotImplementedError

    def forward_with_shared(
        self, cats: Tensor, nums: Tensor, bias: Tensor | None = None, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        out, z = self.forward_tasks(cats, nums, hist)
        return self.add_bias(out, bias), z

    def add_bias(self, out: dict[str, Tensor], bias: Tensor | None) -> dict[str, Tensor]:
        """Adds the bias tower's logit: on the logged bias features (B, Cb) when given (training),
        else its all-unknown output (evaluation and serving)."""
        if self.bias_tower is None:
            return out
        some = next(iter(out.values()))
        if bias is None or bias.shape[-1] == 0:
            unknown = torch.zeros(1, self.bias_tower.n_features, dtype=torch.long, device=some.device)
            b = self.bias_tower(unknown, dropout=False).expand(some.shape[0], -1)  # (B, Tb)
        else:
            b = self.bias_tower(bias)  # (B, Tb)
        out = dict(out)
        for i, t in enumerate(self.bias_tower.tasks):
            out[t] = out[t] + b[:, i]
        return out

    def forward(
        self, cats: Tensor, nums: Tensor, bias: Tensor | None = None, hist: History | None = None
    ) -> dict[str, Tensor]:
        return self.forward_with_shared(cats, nums, bias, hist)[0]

    def forward_request(self, r: RequestBatch) -> dict[str, Tensor]:
        """Serving: the same outputs as ``forward`` on the broadcast request (the bias tower at
        unknown features)."""
        return self.add_bias(self.request_tasks(r), None)

    def request_tasks(self, r: RequestBatch) -> dict[str, Tensor]:
        """``forward_tasks``'s outputs for one request; architectures override it to compute the
        request-constant part of their first layer once."""
        return self.forward_tasks(*r.full(), r.full_history())[0]

    # -- parameter views for the multi-task machinery -------------------------------------------
    def feature_embeddings(self) -> list[FeatureEmbedding]:
        """The embedding modules the serving features (``cats``) go through (not the bias tower's)."""
        embed = getattr(self, "embed", None)
        mods = embed.values() if isinstance(embed, nn.ModuleDict) else [embed]
        return [m for m in mods if isinstance(m, FeatureEmbedding)]

    def shared_parameters(self) -> list[Tensor]:
        """Parameters that more than one task's loss depends on."""
        return []

    def last_shared_parameters(self) -> list[Tensor]:
        """The weight of the last shared layer (GradNorm); empty when nothing is shared."""
        return []

    def task_towers(self) -> dict[str, nn.Module]:
        """Per-task modules whose same-named parameters correspond (soft parameter sharing)."""
        towers = getattr(self, "towers", None)
        return dict(towers.items()) if isinstance(towers, nn.ModuleDict) else {}

    def reset_heads(self) -> None:
        """Re-initialise every output layer (task towers' and the bias tower's)."""
        towers = getattr(self, "towers", None)
        for tower in towers.values() if isinstance(towers, nn.ModuleDict) else []:
            if isinstance(tower, Tower):
                tower.out.reset_parameters()
        if self.bias_tower is not None:
            self.bias_tower.out.reset_parameters()

    def param_depths(self) -> dict[str, int]:
        """Layers between each parameter and the output: 0 for towers / heads / the bias tower,
        growing towards the input, the embeddings deepest (layer-wise learning-rate decay)."""
        out = {}
        for name, _ in self.named_parameters():
            top = name.split(".", 1)[0]
            out[name] = 0 if top in ("towers", "head", "task_emb", "bias_tower") else self._depth(name)
        return out

    def _depth(self, name: str) -> int:
        raise NotImplementedError


def _layer_index(name: str, pattern: str) -> int:
    """The integer captured by ``pattern`` in a parameter name (e.g. 'bottom\\.(\\d+)\\.')."""
    m = re.search(pattern, name)
    if m is None:
        raise ValueError(f"unexpected parameter name {name!r}")
    return int(m.group(1))


class SeparateTowers(MultiTaskNet):
    def __init__(
        self,
        cfg: ModelConfig,
        cards: Sequence[int],
        n_nums: int,
        tasks: Sequence[str],
        seqs: Sequence[SequenceLayout] = (),
    ) -> None:
        super().__init__(tasks)
        embeds = {t: FeatureEmbedding(cards, n_nums, cfg.embed_dim, seqs) for t in tasks}
        self.embed = nn.ModuleDict(embeds)
        d_in = embeds[tasks[0]].out_dim
        self.bottom = nn.ModuleDict({t: mlp(d_in, cfg.bottom_dims, cfg.dropout)[0] for t in tasks})
        d_b = cfg.bottom_dims[-1] if cfg.bottom_dims else d_in
        self.towers = nn.ModuleDict({t: Tower(d_b, cfg.tower_dims, cfg.dropout) for t in tasks})
        self.n_bottom = len(cfg.bottom_dims)

    def forward_tasks(
        self, cats: Tensor, nums: Tensor, hist: History | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        z = torch.stack([self.embed[t](cats, nums, hist) for t in self.tasks], dim=1)  # (B, T, D)
        out = {t: self.towers[t](self.bottom[t](z[:, i])) for i, t in enumerate(self.tasks)}
        return out, z

    def request_tasks(self, r: RequestBatch) -> dict[str, Tensor]:
        if not self.n_bottom:
            return super().request_tasks(r)
        out = {}
        for t in self.tasks:
            embed, bottom = self.embed[t], self.bottom[t]
            assert isinstance(embed, FeatureEmbedding) and isinstance(bottom, nn.Sequential)
            first = bottom[0]
            assert isinstance(first, nn.Linear)
            h = bottom[1:](split_linear(*embed.split(r), first))  # (B, H)
            out[t] = self.towers[t](h)
        return out

    def task_towers(self) -> dict[str, nn.Module]:
        # nothing is shared, so the whole per-task network is the "tower" soft sharing ties together
        return {t: nn.ModuleList([self.embed[t], self.bottom[t], self.towers[t]]) for t in self.tasks}

    def _depth(self, name: str) -> int:
        if name.startswith("embed."):
            return self.n_bottom + 1
        return self.n_bottom - _layer_index(name, r"^bottom\.[^.]+\.(\d+)\.") // 3


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

    def _depth(self, name: str) -> int:
        if name.startswith("embed."):
            return self.n_bottom + 1
        return self.n_bottom - _layer_index(name, r"^bottom\.(\d+)\.") // 3


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
        return self.above_first(h)

    def above_first(self, h: Tensor) -> Tensor:
        """Everything after the first layer's pre-activation h (B, E, H1)."""
        h = self.dropout(F.relu(h))
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = self.dropout(F.relu(torch.einsum("beh,ehk->bek", h, w) + b))  # (B, E, Hk)
        return h

    def first_split(self, x_var: Tensor, x_const: Tensor, var_idx: Tensor, const_idx: Tensor) -> Tensor:
        """The first layer's pre-activation (B, E, H1), the request-constant part computed once."""
        w = self.weights[0]  # (E, D, H1)
        if torch.is_grad_enabled() and w.requires_grad:
            w_const, w_var = w[:, const_idx], w[:, var_idx]
        else:  # serving: the gathered columns are cached (split_weight)
            w_const, w_var = split_weight(w, const_idx, 1), split_weight(w, var_idx, 1)
        const = torch.einsum("bd,edh->beh", x_const, w_const) + self.biases[0]  # (1, E, H1)
        h: Tensor = torch.einsum("bd,edh->beh", x_var, w_var) + const  # (B, E, H1)
        return h


def expert_keep_mask(batch: int, n_experts: int, p: float, device: torch.device) -> Tensor:
    """Expert dropout for gates: (B, E) bool, each expert kept with prob 1-p, never none kept."""
    keep = torch.rand(batch, n_experts, device=device) >= p  # (B, E)
    fallback = F.one_hot(torch.randint(n_experts, (batch,), device=device), n_experts).bool()
    return torch.where(keep.any(dim=1, keepdim=True), keep, fallback)


class MMoE(MultiTaskNet):
    def __init__(
        self,
        cfg: ModelConfig,
        cards: Sequence[int],
        n_nums: int,
        tasks: Sequence[str],
        seqs: Sequence[SequenceLayout] = (),
    ) -> None:
        super().__init__(tasks)
        self.n_experts = cfg.n_experts
        self.gate_dropout = cfg.gate_dropout
        self.embed = FeatureEmbedding(cards, n_nums, cfg.embed_dim, seqs)
        self.experts = Experts(cfg.n_experts, self.embed.out_dim, cfg.expert_dims, cfg.dropout)
        self.gates = nn.ModuleDict({t: nn.Linear(self.embed.out_dim, cfg.n_experts) for t in tasks})
        self.towers = nn.ModuleDict(
            {t: Tower(self.experts.out_dim, cfg.tower_dims, cfg.dropout) for t in tasks}
        )
        self.n_layers = len(cfg.expert_dims)

    def gate_probs(self, x: Tensor) -> dict[str, Tensor]:
        """Per-task softmax over experts, (B, E) each; expert dropout while training."""
        keep: Tensor | None = None
        if self.training and self.gate_dropout > 0:
            keep = expert_keep_mask(x.shape[0], self.n_experts, self.gate_dropout, x.device)  # (B, E)
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

    def request_tasks(self, r: RequestBatch) -> dict[str, Tensor]:
        if not self.n_layers:
            return super().request_tasks(r)
        parts = self.embed.split(r)
        h = self.experts.above_first(self.experts.first_split(*parts))  # (B, E, H)
        out = {}
        for t in self.tasks:
            gate = self.gates[t]
            assert isinstance(gate, nn.Linear)
            g = torch.softmax(split_linear(*parts, gate), dim=-1)  # (B, E)
            out[t] = self.towers[t](torch.einsum("be,beh->bh", g, h))
        return out

    @torch.no_grad()
    def gate_weights(self, cats: Tensor, nums: Tensor, hist: History | None = None) -> Tensor:
        """Gate probabilities (B, T, E) in eval mode, for expert-utilisation statistics."""
        g = self.gate_probs(self.embed(cats, nums, hist))
        return torch.stack([g[t] for t in self.tasks], dim=1)

    def shared_parameters(self) -> list[Tensor]:
        return [*self.embed.parameters(), *self.experts.parameters()]

    def last_shared_parameters(self) -> list[Tensor]:
        return [self.experts.weights[-1]] if self.n_layers else [self.embed.emb.weight]

    def _depth(self, name: str) -> int:
        if name.startswith("embed."):
            return self.n_layers + 1
        if name.startswith("gates."):
            return 1
        return self.n_layers - _layer_index(name, r"^experts\.(?:weights|biases)\.(\d+)$")


class PLELevel(nn.Module):
    """One extraction network of PLE (a CGC block).

    Experts at this level, in the order used for gate statistics: task 0's ``n_task`` experts,
    task 1's, ..., then the ``n_shared`` shared experts. Task t's gate mixes [its experts, shared
    experts]; below the last level a shared gate mixes all of them into the next level's shared
    input.
    """

    def __init__(self, in_dim: int, cfg: ModelConfig, tasks: Sequence[str], last: bool) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.n_task, self.n_shared = cfg.n_task_experts, cfg.n_shared_experts
        self.gate_dropout = cfg.gate_dropout
        self.task_experts = nn.ModuleDict(
            {t: Experts(self.n_task, in_dim, cfg.expert_dims, cfg.dropout) for t in tasks}
        )
        self.shared_experts = Experts(self.n_shared, in_dim, cfg.expert_dims, cfg.dropout)
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
                k = keep[:, self._columns(t)]  # (B, n)
                fallback = F.one_hot(torch.randint(k.shape[1], (k.shape[0],), device=k.device), k.shape[1])
                k = torch.where(k.any(dim=1, keepdim=True), k, fallback.bool())  # never drop all experts
                logits = logits.masked_fill(~k, float("-inf"))
            out[name] = torch.softmax(logits, dim=-1)
        return out

    def forward(self, xs: Sequence[Tensor], x_shared: Tensor) -> tuple[list[Tensor], Tensor | None]:
        hs = self.shared_experts(x_shared)  # (B, Es, H)
        ht = [self.task_experts[t](xs[i]) for i, t in enumerate(self.tasks)]  # T x (B, Et, H)
        return self._mix(ht, hs, self.gate_probs(xs, x_shared))

    def forward_split(
        self, parts: tuple[Tensor, Tensor, Tensor, Tensor]
    ) -> tuple[list[Tensor], Tensor | None]:
        """Serving (eval): ``forward([x] * T, x)`` for a request's split input x (FeatureEmbedding.split),
        the request-constant share of every expert's and gate's first layer computed once."""
        hs = self.shared_experts.above_first(self.shared_experts.first_split(*parts))  # (B, Es, H)
        ht = []  # T x (B, Et, H)
        for t in self.tasks:
            experts = self.task_experts[t]
            assert isinstance(experts, Experts)
            ht.append(experts.above_first(experts.first_split(*parts)))
        gates = {t: self.gates[t] for t in self.tasks}
        if self.shared_gate is not None:
            gates["shared"] = self.shared_gate
        g = {}
        for name, gate in gates.items():
            assert isinstance(gate, nn.Linear)
            g[name] = torch.softmax(split_linear(*parts, gate), dim=-1)  # (B, n)
        return self._mix(ht, hs, g)

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
        cfg: ModelConfig,
        cards: Sequence[int],
        n_nums: int,
        tasks: Sequence[str],
        seqs: Sequence[SequenceLayout] = (),
    ) -> None:
        super().__init__(tasks)
        self.embed = FeatureEmbedding(cards, n_nums, cfg.embed_dim, seqs)
        levels, d = [], self.embed.out_dim
        for k in range(cfg.ple_levels):
            level = PLELevel(d, cfg, tasks, last=k == cfg.ple_levels - 1)
            levels.append(level)
            d = level.out_dim
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleDict({t: Tower(d, cfg.tower_dims, cfg.dropout) for t in tasks})
        self.n_layers = len(cfg.expert_dims)  # per level

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

    def request_tasks(self, r: RequestBatch) -> dict[str, Tensor]:
        if not self.n_layers:
            return super().request_tasks(r)
        levels = self.level_list
        xs, x_shared = levels[0].forward_split(self.embed.split(r))  # the first level sees x itself
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

    def _depth(self, name: str) -> int:
        n_levels = len(self.levels)
        if name.startswith("embed."):
            return n_levels * self.n_layers + 1
        level = _layer_index(name, r"^levels\.(\d+)\.")
        below = (n_levels - 1 - level) * self.n_layers  # layers of the levels above this one
        if ".gates." in name or ".shared_gate." in name:
            return below + 1
        return below + self.n_layers - _layer_index(name, r"\.(?:weights|biases)\.(\d+)$")


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
        cfg: ModelConfig,
        cards: Sequence[int],
        n_nums: int,
        tasks: Sequence[str],
        seqs: Sequence[SequenceLayout] = (),
    ) -> None:
        super().__init__(tasks)
        self.conditioning = cfg.conditioning
        self.embed = FeatureEmbedding(cards, n_nums, cfg.embed_dim, seqs)
        d_x = self.embed.out_dim
        d_z = d_x if cfg.conditioning == "add" else cfg.task_embed_dim
        self.task_emb = nn.Parameter(0.1 * torch.randn(len(tasks), d_z))  # z_t, (T, Dz)
        dims = [d_x + d_z if cfg.conditioning == "concat" else d_x, *cfg.bottom_dims]
        self.trunk = nn.ModuleList([nn.Linear(a, b) for a, b in pairwise(dims)])
        self.film = nn.ModuleList(
            [nn.Linear(d_z, 2 * d) for d in cfg.bottom_dims] if cfg.conditioning == "film" else []
        )
        for layer in self.film:
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = Tower(dims[-1], cfg.tower_dims, cfg.dropout)

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

    def request_tasks(self, r: RequestBatch) -> dict[str, Tensor]:
        """The first trunk layer is affine in [x, z_t] (concat) or x + z_t (add): its x share, with
        the request-constant columns computed once, plus a per-task z_t share (T, H1)."""
        if not len(self.trunk):
            return super().request_tasks(r)
        first = self.trunk[0]
        assert isinstance(first, nn.Linear)
        d_x, z = self.embed.out_dim, self.task_emb  # z: (T, Dz)
        h = split_linear(*self.embed.split(r), first)  # (B, H1); concat ignores the z columns here
        if self.conditioning == "concat":
            h = h[None] + (z @ first.weight[:, d_x:].T)[:, None, :]  # (T, B, H1)
        elif self.conditioning == "add":
            h = h[None] + (z @ first.weight.T)[:, None, :]  # W (x + z_t) + b = (W x + b) + W z_t
        else:
            h = h[None].expand(len(self.tasks), *h.shape)  # FiLM conditions after the layer
        return self._above_first(h)

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

    def _depth(self, name: str) -> int:
        if name.startswith("embed."):
            return len(self.trunk) + 1
        return len(self.trunk) - _layer_index(name, r"^(?:trunk|film)\.(\d+)\.")


ARCHS: dict[
    str, Callable[[ModelConfig, Sequence[int], int, Sequence[str], Sequence[SequenceLayout]], MultiTaskNet]
] = {
    "separate": SeparateTowers,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "conditioned": Conditioned,
}


def build_model(cfg: ModelConfig, schema: FeatureSchema, tasks: Sequence[TaskConfig]) -> MultiTaskNet:
    cards = [f.cardinality for f in schema.cats()]
    names = [f.name for f in schema.cats()]
    seqs = [
        SequenceLayout(q.name, q.pooling, q.max_len, [names.index(c) for c in q.items])
        for q in schema.sequences
    ]
    net = ARCHS[cfg.arch](cfg, cards, schema.n_nums, [t.name for t in tasks], seqs)
    if cfg.bias_features:
        have = [f.name for f in schema.bias]
        if have != list(cfg.bias_features):
            raise ValueError(f"model.bias_features {cfg.bias_features} but the schema has {have}")
        net.bias_tower = BiasTower(
            [f.cardinality for f in schema.bias],
            cfg.embed_dim,
            cfg.bias_dims,
            cfg.bias_tasks,
            cfg.bias_dropout,
        )
    return net
