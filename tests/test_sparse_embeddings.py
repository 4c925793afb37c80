"""Sparse embedding updates and hashed ids (``train.sparse_embeddings``, ``hash_buckets``).

A sparse step must read and write only the embedding rows its batch uses, whatever the table size;
a hashed feature maps a value to ``1 + hash mod N`` in training and at serving alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TrainTiny
from fastapi.testclient import TestClient
from modelkit import service_settings, tiny_config
from test_train_serve_parity import _sharper, assert_serving_matches_offline

from model import load_checkpoint, resolve_checkpoint, stable_hash
from model.config import Config, ConfigError, PlainWeighting
from model.features import FeatureSchema, FeatureSpec
from model.nets import build_model
from model.train import batch_embedding_l2, embedding_row_counts, make_optimizer, train_step
from model.weighting import make_weighting
from service.app import create_app

BUCKETS = 5_000


def hashed_net(cfg: Config) -> torch.nn.Module:
    specs = [
        FeatureSpec("user_id", "user", "categorical", hash_buckets=BUCKETS),
        FeatureSpec("tag", "video", "categorical", vocab=[str(j) for j in range(20)]),
        FeatureSpec("age", "video", "numeric"),
    ]
    return build_model(cfg.model, FeatureSchema(specs), cfg.tasks)


def sparse_config() -> Config:
    cfg = tiny_config()
    cfg.train.sparse_embeddings = True
    cfg.train.embed_weight_decay = 0.0
    cfg.train.embed_batch_l2 = 0.05
    return cfg.validated()


def test_a_sparse_step_updates_only_the_rows_its_batch_uses() -> None:
    torch.manual_seed(0)
    cfg = sparse_config()
    net = hashed_net(cfg)
    (emb,) = net.feature_embeddings()
    emb.emb.sparse = True
    weighting = make_weighting(cfg.train, cfg.tasks)
    opt = make_optimizer(net, weighting, cfg)
    assert any(isinstance(o, torch.optim.SparseAdam) for o in opt.opts)
    assert all(
        emb.emb.weight is not p
        for o in opt.opts
        if isinstance(o, torch.optim.Adam)
        for g in o.param_groups
        for p in g["params"]
    )

    B = 64

    def batch() -> tuple[torch.Tensor, ...]:
        cats = torch.stack([torch.randint(1, BUCKETS + 1, (B,)), torch.randint(0, 21, (B,))], dim=1)
        return cats, torch.randn(B, 1), torch.rand(B, len(cfg.tasks)).round()  # (B, 2), (B, 1), (B, T)

    def step(cats: torch.Tensor, nums: torch.Tensor, labels: torch.Tensor) -> None:
        counts = embedding_row_counts(net, cats.numpy())
        train_step(net, weighting, opt, (cats, nums, labels, None, None), cfg.tasks, batch_l2=(0.05, counts))

    step(*batch())  # the rows of this batch now carry Adam moments
    for _ in range(3):
        cats, nums, labels = batch()
        before = emb.emb.weight.detach().clone()
        step(cats, nums, labels)
        after = emb.emb.weight.detach()
        used = torch.zeros(len(before), dtype=torch.bool)
        used[torch.unique(cats + emb.offsets)] = True
        assert int(used.sum()) < 0.02 * len(before)
        # bit for bit, also the rows earlier batches used (a dense Adam moves them by their momentum)
        assert torch.equal(after[~used], before[~used])
        assert (after[used] != before[used]).any(dim=1).all()  # every used row moved


def test_the_batch_l2_of_a_sparse_table_equals_the_dense_one() -> None:
    torch.manual_seed(1)
    net = hashed_net(sparse_config())
    (emb,) = net.feature_embeddings()
    cats = torch.stack([torch.randint(1, BUCKETS + 1, (32,)), torch.randint(0, 21, (32,))], dim=1)
    counts = embedding_row_counts(net, cats.numpy())
    grads = []
    for sparse in (False, True):
        emb.emb.sparse = sparse
        emb.emb.weight.grad = None
        penalty = batch_embedding_l2(net, cats, counts)
        penalty.backward()
        g = emb.emb.weight.grad
        assert g is not None and g.is_sparse == sparse
        grads.append((float(penalty.detach()), g.to_dense()))
    (p_dense, g_dense), (p_sparse, g_sparse) = grads
    assert p_sparse == pytest.approx(p_dense, rel=1e-6) and p_dense > 0
    torch.testing.assert_close(g_sparse, g_dense)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embed_weight_decay": 1e-3}, "embed_weight_decay = 0"),
        ({"weighting": PlainWeighting("pcgrad")}, "PCGrad"),
    ],
)
def test_sparse_tables_refuse_what_would_touch_every_row(change: dict[str, object], message: str) -> None:
    cfg = sparse_config()
    for k, v in change.items():
        setattr(cfg.train, k, v)
    with pytest.raises(ConfigError, match=message):
        cfg.validated()


def test_hashed_ids_map_to_one_plus_hash_mod_buckets() -> None:
    spec = FeatureSpec("user_id", "user", "categorical", hash_buckets=7)
    assert spec.cardinality == 8
    values = ["u1", "u2", "a-new-user", 12345]
    codes = np.array([stable_hash(v) for v in values], dtype=np.int64)
    got = spec.encode_codes(codes)
    want = [1 + int(np.uint64(np.int64(c).view(np.uint64)) % np.uint64(7)) for c in codes]
    assert got.tolist() == want
    assert ((got >= 1) & (got <= 7)).all()  # no value is "unknown": every id has a trained row
    with pytest.raises(Exception, match="no vocabulary"):
        FeatureSpec("x", "user", "categorical", hash_buckets=3, vocab=["a"])


@pytest.fixture(scope="module")
def hashed_artifacts(tmp_path_factory: pytest.TempPathFactory, train_tiny: TrainTiny) -> Path:
    def configure(cfg: Config) -> None:
        _sharper(cfg)
        cfg.train.sparse_embeddings = True
        cfg.train.embed_batch_l2 = 0.05
        (user,) = [f for f in cfg.data.features if f.name == "user_id"]
        user.hash_buckets = 64  # fewer buckets than the fixture's users: collisions are served alike

    path = tmp_path_factory.mktemp("hashed")
    train_tiny(path, seed=0, configure=configure)
    return path


@pytest.mark.slow
def test_a_sparse_hashed_model_serves_what_training_evaluates(hashed_artifacts: Path) -> None:
    ckpt = load_checkpoint(resolve_checkpoint(hashed_artifacts))
    (user,) = [f for f in ckpt.schema.features if f.name == "user_id"]
    assert user.hash_buckets == 64 and not user.vocab and user.cardinality == 65
    assert ckpt.config.train.sparse_embeddings
    with TestClient(create_app(service_settings(hashed_artifacts))) as c:
        assert_serving_matches_offline(c, hashed_artifacts)
