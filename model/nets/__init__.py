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

One file an architecture (``separate``, ``shared_bottom``, ``mmoe``, ``ple``, ``conditioned``), each
built from ``base``: embeddings, MLPs, towers, the bias tower, the request split and the
``MultiTaskNet`` interface.

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

from collections.abc import Callable, Sequence

from model.config import ModelConfig, TaskConfig
from model.features import FeatureSchema
from model.nets.base import (
    BiasTower,
    FeatureEmbedding,
    History,
    MultiTaskNet,
    RequestBatch,
    SequenceLayout,
    Tower,
    mlp,
    split_weight,
)
from model.nets.conditioned import Conditioned
from model.nets.mmoe import Experts, MMoE
from model.nets.ple import PLE
from model.nets.separate import SeparateTowers
from model.nets.shared_bottom import SharedBottom

ARCHS: dict[str, Callable[..., MultiTaskNet]] = {
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
    net = ARCHS[cfg.arch](
        cards,
        schema.n_nums,
        [t.name for t in tasks],
        seqs,
        embed_dim=cfg.embed_dim,
        tower_dims=cfg.tower_dims,
        dropout=cfg.dropout,
        **cfg.net_args(),  # the architecture's own keys ([model.<arch>])
    )
    if cfg.bias_features:
        have = [f.name for f in schema.bias]
        if have != list(cfg.bias_features):
            raise ValueError(f"model.bias_features {cfg.bias_features} but the schema has {have}")
        net.bias_tower = BiasTower(
            [f.cardinality for f in schema.bias],
            cfg.embed_dim,
            cfg.bias_dims,
            cfg.bias_tasks or [tasks[0].name],
            cfg.bias_dropout,
        )
    return net


__all__ = [
    "ARCHS",
    "PLE",
    "BiasTower",
    "Conditioned",
    "Experts",
    "FeatureEmbedding",
    "History",
    "MMoE",
    "MultiTaskNet",
    "RequestBatch",
    "SeparateTowers",
    "SequenceLayout",
    "SharedBottom",
    "Tower",
    "build_model",
    "mlp",
    "split_weight",
]
