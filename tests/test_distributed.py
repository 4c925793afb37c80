"""Distributed (DDP) training: ``torchrun --nproc_per_node=2 -m model.train`` reproduces single-process
``python -m model.train`` on the 300-user KuaiRand fixture; rank sharding and the loss normalisation
that makes the two agree with masked labels."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from modelkit import ROOT, tiny_toml

from model.checkpoint import Checkpoint, list_versions, load_checkpoint, resolve_checkpoint
from model.config import ConfigError, TaskConfig, load_config
from model.data import load_dataset
from model.distributed import check_supported, global_loss_scale, rank_shard
from model.train import predict, task_losses, train


def test_gloo_backend_is_available() -> None:
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available()


# Measured on the fixture: the 2-process model differs from the single-process one by ~3e-7 in any
# parameter and ~6e-8 in any predicted probability (float32 summation order); naive per-rank loss
# means (no global normalisation) give ~9e-3 / ~2e-4, another seed ~0.5 / ~0.1.
TOL = 1e-5


# --------------------------------------------------------------------------------------------
# sharding and normalisation (in process)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 985, 1054])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_shard_is_a_disjoint_equal_length_cover_of_the_permutation(n, world):
    perm = np.random.default_rng(n).permutation(n)
    shards = [rank_shard(perm, r, world) for r in range(world)]
    assert {len(s) for s in shards} == {math.ceil(n / world)}  # equal steps on every rank
    real = np.concatenate([s[s >= 0] for s in shards])
    assert len(real) == n and sorted(real.tolist()) == list(range(n))  # disjoint, covers perm
    assert sum(int((s < 0).sum()) for s in shards) == (-n) % world  # padding only to a multiple of W
    # per-rank batches of b rows make up exactly the single-process batches of b * world rows
    b = 3
    steps = math.ceil(len(shards[0]) / b)
    assert steps == math.ceil(n / (b * world))
    for s in range(steps):
        union = np.concatenate([sh[s * b : (s + 1) * b] for sh in shards])
        assert sorted(union[union >= 0].tolist()) == sorted(
            perm[s * b * world : (s + 1) * b * world].tolist()
        )
    with pytest.raises(ValueError):
        rank_shard(perm, world, world)


def test_scaled_per_rank_losses_average_to_the_global_batch_loss():
    """DDP averages per-rank gradients; with masked labels the per-rank means must be rescaled."""
    g = torch.Generator().manual_seed(0)
    tasks = [TaskConfig("engagement"), TaskConfig("satisfaction", mask_by="click")]
    n, world = 37, 2  # odd: one padded slot
    x = torch.randn(n, 5, generator=g)
    labels = (torch.rand(n, 2, generator=g) < 0.4).float()
    labels[torch.rand(n, generator=g) < 0.7, 1] = float("nan")  # satisfaction mostly unobserved
    theta = torch.randn(5, 2, generator=g)

    def grad(loss_fn):
        w = theta.clone().requires_grad_(True)
        loss_fn(w).backward()
        return w.grad

    def global_loss(w):
        out = x @ w
        losses = task_losses({"engagement": out[:, 0], "satisfaction": out[:, 1]}, labels, tasks)
        return losses["engagement"] + losses["satisfaction"]

    def ddp_mean(w, scaled):
        total = torch.zeros(())
        for r in range(world):
            idx = rank_shard(np.arange(n), r, world)
            real = torch.from_numpy(idx >= 0)
            y = labels[torch.from_numpy(np.where(idx >= 0, idx, 0))]
            y[~real] = float("nan")
            out = x[torch.from_numpy(np.where(idx >= 0, idx, 0))] @ w
            losses = task_losses({"engagement": out[:, 0], "satisfaction": out[:, 1]}, y, tasks)
            scale = global_loss_scale(y, labels, world) if scaled else torch.ones(2)
            total = total + losses["engagement"] * scale[0] + losses["satisfaction"] * scale[1]
        return total / world

    want = grad(global_loss)
    assert torch.allclose(grad(lambda w: ddp_mean(w, True)), want, atol=1e-6)
    assert not torch.allclose(grad(lambda w: ddp_mean(w, False)), want, atol=1e-3)
    assert float(ddp_mean(theta, True)) == pytest.approx(float(global_loss(theta)), abs=1e-6)


def test_weightings_that_need_global_per_task_gradients_are_rejected(tmp_path):
    cfg = load_config(tiny_toml(tmp_path))
    for weighting in ("static", "uncertainty"):
        cfg.train.weighting = weighting  # type: ignore[assignment]
        check_supported(cfg, 2)
    for weighting in ("mgda", "pcgrad", "gradnorm", "worst_case"):
        cfg.train.weighting = weighting  # type: ignore[assignment]
        with pytest.raises(ConfigError, match="not supported with distributed training"):
            check_supported(cfg, 2)
    cfg.train.weighting = "static"
    cfg.train.embed_batch_l2 = 0.01
    with pytest.raises(ConfigError, match="embed_batch_l2"):
        check_supported(cfg, 2)
    cfg.train.embed_batch_l2 = 0.0
    cfg.train.batch_size = 255
    with pytest.raises(ConfigError, match="divisible"):
        check_supported(cfg, 2)


# --------------------------------------------------------------------------------------------
# end to end: torchrun with 2 processes vs one process


def ddp_toml(tmp_path: Path) -> Path:
    """The tiny KuaiRand fixture config, deterministic (no dropout), 2 epochs, satisfaction masked by
    click (per-rank label counts differ), and an odd number of train rows (one padded slot)."""
    src = Path(tiny_toml(tmp_path)).read_text()
    for old, new in [
        ("drop_duplicates = true", "drop_duplicates = true\nmax_rows = 2700"),  # 985 train rows
        ('label = "is_like"', 'label = "is_like"\nmask_by = "is_click"'),
        ("embed_dim = 16", "embed_dim = 4"),
        ("tower_dims = [32]", "tower_dims = [8]"),
        ("dropout = 0.1\ngate_dropout = 0.1", "dropout = 0.0\ngate_dropout = 0.0"),
        ("epochs = 1", "epochs = 2"),
        ("batch_size = 1024", "batch_size = 256\nlog_every = 1"),
        ("patience = 1", "patience = 10"),
    ]:
        assert src.count(old) == 1, f"the shipped config changed: {old!r}"
        src = src.replace(old, new)
    path = tmp_path / "ddp.toml"
    path.write_text(src)
    return path


def run(args: list[str], timeout: float = 150) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # 2 cores: one thread per process (torchrun does the same)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return time.perf_counter() - t0


def differences(a: Checkpoint, b: Checkpoint) -> tuple[float, float]:
    """Max |difference| over every float parameter, and over predicted test-split probabilities."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    params = max(float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].is_floating_point())
    test = load_dataset(a.config, schema=a.schema).test
    pa, pb = predict(a.model, test, a.config.tasks), predict(b.model, test, b.config.tasks)
    probs = max(float(np.abs(pa[t] - pb[t]).max()) for t in pa)
    return params, probs


@pytest.mark.timeout(300)
def test_two_process_ddp_training_matches_single_process(tmp_path):
    config = ddp_toml(tmp_path)
    single, multi = tmp_path / "single", tmp_path / "ddp"
    run(["-m", "model.train", "--config", str(config), "--artifacts", str(single)])
    run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "model.train",
            "--config",
            str(config),
            "--artifacts",
            str(multi),
        ]
    )
    a = load_checkpoint(resolve_checkpoint(single))  # valid: digests, shapes, config all check out
    b = load_checkpoint(resolve_checkpoint(multi))
    assert len(list_versions(multi)) == 1  # only rank 0 wrote
    assert not [p for p in (multi / "models").iterdir() if p.name.startswith(".tmp")]
    assert a.schema.to_dict() == b.schema.to_dict()
    assert a.manifest["config"] == b.manifest["config"]
    assert {k: v.shape for k, v in a.model.state_dict().items()} == {
        k: v.shape for k, v in b.model.state_dict().items()
    }
    assert b.manifest["metrics"]["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "per_rank_batch_size": 128,
    }
    assert b.manifest["data_fingerprint"]["train_rows"] % 2 == 1  # the padded tail is exercised

    params, probs = differences(a, b)
    assert params < TOL and probs < TOL, (params, probs)
    ha, hb = a.manifest["history"], b.manifest["history"]
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb] == [1, 2]
    for x, y in zip(ha, hb, strict=True):
        for k in ("train/loss", "train/satisfaction/loss", "valid/loss"):
            assert y[k] == pytest.approx(x[k], abs=1e-5), k
    for k in ("test/engagement/auc", "test/satisfaction/auc", "test/loss"):
        assert b.manifest["metrics"][k] == pytest.approx(a.manifest["metrics"][k], abs=1e-4), k
    # the step log: same steps, same records; the ranks' loss shares sum to the global batch's losses
    sa, sb = a.manifest["step_log"], b.manifest["step_log"]
    assert sa and [r["step"] for r in sa] == [r["step"] for r in sb]
    for x, y in zip(sa, sb, strict=True):
        assert list(y) == list(x)  # the same keys in the same order
        assert y["epoch"] == x["epoch"]
        for k in ("loss", "engagement/loss", "satisfaction/loss", "weight/engagement", "weight/satisfaction"):
            assert y[k] == pytest.approx(x[k], abs=1e-5), k

    # the check has teeth: another seed's single-process model is far outside the tolerance
    cfg = load_config(config)
    cfg.train.seed = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, artifacts=tmp_path / "seed1")
    finally:
        torch.set_num_threads(threads)
    params1, probs1 = differences(a, load_checkpoint(resolve_checkpoint(tmp_path / "seed1")))
    assert params1 > 100 * TOL and probs1 > 100 * TOL, (params1, probs1)
