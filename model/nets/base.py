"""What every network is built from: embeddings, MLPs and towers, the request split, the bias
tower, and ``MultiTaskNet``, the interface the multi-task machinery uses (see ``model.nets``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary


def mlp(in_dim: int, dims: Sequence[int], dropout: float) -> tuple[nn.Sequential, int]:
    """Linear -> ReLU -> Dropout stack; returns the module and its output width."""
    layers: list[nn.Module] = []
    for d in dims:
        layers += [nn.Linear(in_dim, d), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = d
    return nn.Sequential(*layers), in_dim


History = Mapping[str, tuple[Tensor, Tensor]]  # sequence -> (items (B, L, K) long, lengths (B,) long)


def keep_at_least_one(keep: Tensor) -> Tensor:
    """Expert dropout in a gate: ``keep`` (B, n) bool, each expert kept with prob 1-p; a row that
    keeps none keeps one expert drawn uniformly instead (a gate never mixes nothing)."""
    fallback = F.one_hot(torch.randint(keep.shape[1], (keep.shape[0],), device=keep.device), keep.shape[1])
    return torch.where(keep.any(dim=1, keepdim=True), keep, fallback.bool())  # (B, n)


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


def split_columns(w: Tensor, var_idx: Tensor, const_idx: Tensor) -> tuple[Tensor, Tensor]:
    """(w_var, w_const): the input columns (dim 1) of a first layer's weight that x_var and x_const
    meet, gathered in the autograd graph when w trains, else once per weight (``split_weight``)."""
    if torch.is_grad_enabled() and w.requires_grad:
        return w[:, var_idx], w[:, const_idx]
    return split_weight(w, var_idx, 1), split_weight(w, const_idx, 1)


def split_linear(
    x_var: Tensor, x_const: Tensor, var_idx: Tensor, const_idx: Tensor, layer: nn.Linear
) -> Tensor:
    """layer(x) for x = x_var and x_const interleaved: the constant part is computed once."""
    w_var, w_const = split_columns(layer.weight, var_idx, const_idx)  # (H, Dv), (H, Dc)
    const = x_const @ w_const.T + layer.bias  # (1, H)
    out: Tensor = x_var @ w_var.T + const  # (B, H)
    return out


@runtime_checkable
class SplitLayer(Protocol):
    """A first layer other than ``nn.Linear`` (``Experts``) that computes its pre-activation on the
    split x (``FeatureEmbedding.split``), the request-constant share once."""

    def first_split(self, x_var: Tensor, x_const: Tensor, var_idx: Tensor, const_idx: Tensor) -> Tensor: ...


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
    views, and opt into the serving request split by declaring their first layers
    (``first_layers``, ``above_first_layers``); the bias tower is handled here, so every arch
    supports it.
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
        """``forward_tasks``'s outputs for one request (1 user, B candidates).

        The request split: an architecture that declares the layers reading the embedding output x
        (``first_layers``) gets their pre-activations computed on the split x, the user and context
        columns' share once per request and the candidate columns' share per row, and the rest of
        its forward runs on those (``above_first_layers``). One that declares none is run on the
        request broadcast to B rows.
        """
        firsts = self.first_layers()
        if not firsts:
            return self.forward_tasks(*r.full(), r.full_history())[0]
        splits: dict[FeatureEmbedding, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        h = []
        for embed, layer in firsts:
            if embed not in splits:  # each embedding module once (SeparateTowers has one a task)
                splits[embed] = embed.split(r)  # x_var (B, Dv), x_const (1, Dc), their columns
            if isinstance(layer, nn.Linear):
                h.append(split_linear(*splits[embed], layer))  # (B, H)
            elif isinstance(layer, SplitLayer):
                h.append(layer.first_split(*splits[embed]))  # e.g. (B, E, H) for Experts
            else:
                raise TypeError(f"{type(layer).__name__} cannot read the split request")
        return self.above_first_layers(h)

    def first_layers(self) -> list[tuple[FeatureEmbedding, nn.Module]]:
        """(embedding, layer) for every layer that reads an embedding output x: ``nn.Linear`` or a
        ``SplitLayer``, each affine in x. Declaring them (and ``above_first_layers``) opts the
        architecture into the request split; none (the default) serves the broadcast request."""
        return []

    def above_first_layers(self, h: list[Tensor]) -> dict[str, Tensor]:
        """``forward_tasks``'s outputs (eval) from ``first_layers``' pre-activations h, in their order."""
        raise NotImplementedError

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
        """Layers between each parameter and the output (layer-wise learning-rate decay): 0 for
        towers / heads / the bias tower, the depth its architecture declares (``layer_depths``)
        for the others, the embeddings deepest."""
        declared = {id(p): d for d, params in self.layer_depths() for p in params}
        out = {}
        for name, p in self.named_parameters():
            if id(p) in declared:
                out[name] = declared[id(p)]
            elif name.split(".", 1)[0] in ("towers", "head", "task_emb", "bias_tower"):
                out[name] = 0
            else:
                raise ValueError(f"{type(self).__name__}: no depth declared for parameter {name!r}")
        return out

    def layer_depths(self) -> list[tuple[int, list[nn.Parameter]]]:
        """(depth, parameters) of every layer below the heads, counted from the output."""
        raise NotImplementedError


def linear_layers(seq: nn.Module) -> list[nn.Linear]:
    """The Linear layers of an ``mlp`` stack, input first."""
    return [m for m in seq.modules() if isinstance(m, nn.Linear)]
