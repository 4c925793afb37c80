"""PLE, task conditioning, the multi-task hooks of every net, soft sharing, and the bias tower."""

import copy
import math

import numpy as np
import pytest
import torch
from modelkit import model_config, tiny_config

from model import Ranker
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ConfigError, MMoEConfig, ModelConfig, PLEConfig, TaskConfig, load_config
from model.data import load_dataset
from model.features import FeatureSchema, FeatureSpec, stable_hash
from model.nets import PLE, Conditioned, build_model
from model.synth import make_youtube_log
from model.train import (
    batch_embedding_l2,
    drop_to_unknown,
    embedding_row_counts,
    entity_columns,
    fit,
    impute_unknown_rows,
    param_groups,
    predict,
    unknown_rows_imputed,
)
from model.weighting import tower_l2_penalty

TASKS = [TaskConfig("engagement", "binary", "long_view"), TaskConfig("satisfaction", "binary", "is_like")]
ARCHS = ["separate", "shared_bottom", "mmoe", "ple", "conditioned"]


def _schema(bias: bool = False) -> FeatureSchema:
    specs = [
        FeatureSpec("user_id", "user", "categorical", vocab=[str(i) for i in range(10)]),
        FeatureSpec("video_id", "video", "categorical", vocab=[str(i) for i in range(20)]),
        FeatureSpec("dur", "video", "numeric"),
        FeatureSpec("device", "context", "categorical", vocab=["a", "b"]),
    ]
    if bias:
        specs += [
            FeatureSpec("position", "bias", "categorical", vocab=[str(i) for i in range(1, 11)]),
            FeatureSpec("device", "bias", "categorical", vocab=["a", "b"]),
        ]
    return FeatureSchema(specs)


def _batch(b: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cats = torch.stack(
        [
            torch.randint(0, 11, (b,), generator=g),
            torch.randint(0, 21, (b,), generator=g),
            torch.randint(0, 3, (b,), generator=g),
        ],
        dim=1,
    )
    return cats, torch.randn(b, 1, generator=g)


def _model_cfg(arch: str, **kw) -> ModelConfig:
    """Small layers; ``kw``: [model] keys or the architecture's own ([model.<arch>])."""
    base = dict(embed_dim=4, bottom_dims=[8, 6], expert_dims=[8], tower_dims=[4])
    if arch == "mmoe":
        base["n_experts"] = 3
    return model_config(arch, **{**base, **kw})


# -- PLE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ple_shapes_and_gates_are_distributions(levels):
    cfg = _model_cfg("ple", levels=levels, n_shared_experts=2, n_task_experts=3)
    net = build_model(cfg, _schema(), TASKS)
    assert isinstance(net, PLE) and len(net.levels) == levels
    cats, nums = _batch(64)
    out = net(cats, nums)
    assert set(out) == {"engagement", "satisfaction"}
    assert all(v.shape == (64,) and torch.isfinite(v).all() for v in out.values())
    net.eval()
    g = net.gate_weights(cats, nums)  # (B, T, E_all): 2 tasks x 3 own experts + 2 shared
    assert g.shape == (64, 2, 8)
    torch.testing.assert_close(g.sum(-1), torch.ones(64, 2))
    assert (g[:, 0, 3:6] == 0).all() and (g[:, 1, 0:3] == 0).all()  # a task never sees the other's experts
    by_level = net.gate_weights_by_level(cats, nums)
    assert len(by_level) == levels
    for k, gates in enumerate(by_level):
        assert set(gates) == ({"engagement", "satisfaction"} | ({"shared"} if k < levels - 1 else set()))
        for p in gates.values():
            torch.testing.assert_close(p.sum(-1), torch.ones(64))


def test_ple_gate_dropout_never_drops_every_expert():
    net = build_model(
        _model_cfg("ple", gate_dropout=0.9, n_task_experts=1, n_shared_experts=2), _schema(), TASKS
    )
    assert isinstance(net, PLE)
    net.train()
    cats, nums = _batch(256)
    x = net.embed(cats, nums)
    probs = net.level_list[0].gate_probs([x, x], x)
    for p in probs.values():
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(256))
        assert ((p == 0).sum(-1) >= 1).float().mean() > 0.5


def test_expert_utilization_covers_ple_levels():
    cfg = tiny_config("ple", epochs=1)
    cfg.train.num_threads = 1
    res = fit(cfg, load_dataset(cfg))
    util = res.metrics["expert_utilization"]
    assert set(util) == {
        "engagement",
        "satisfaction",
        "level1/engagement",
        "level1/satisfaction",
        "level1/shared",
    }
    ple = cfg.model.net
    assert isinstance(ple, PLEConfig)
    n = 2 * ple.n_task_experts + ple.n_shared_experts
    for row in util.values():
        assert len(row) == n and sum(row) == pytest.approx(1.0, abs=1e-3)


# -- conditioning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["concat", "add", "film"])
def test_conditioned_runs_one_trunk_per_task(mode):
    net = build_model(_model_cfg("conditioned", conditioning=mode, task_embed_dim=5), _schema(), TASKS)
    assert isinstance(net, Conditioned)
    net.eval()
    cats, nums = _batch(16)
    out = net(cats, nums)
    assert all(v.shape == (16,) for v in out.values())
    assert not any(n.startswith("towers") for n, _ in net.named_parameters())  # one shared head
    if mode == "film":
        # FiLM starts at the identity: the tasks only differ once gamma / beta are learned
        torch.testing.assert_close(out["engagement"], out["satisfaction"])
        with torch.no_grad():
            for layer in net.film:
                layer.weight.normal_()
    out = net(cats, nums)
    assert not torch.allclose(out["engagement"], out["satisfaction"])
    # the task embedding is the only task-specific input: changing z_1 changes only task 1
    with torch.no_grad():
        net.task_emb[1] += 1.0
    out2 = net(cats, nums)
    torch.testing.assert_close(out2["engagement"], out["engagement"])
    assert not torch.allclose(out2["satisfaction"], out["satisfaction"])


@pytest.mark.slow
def test_conditioned_and_ple_train():
    for arch in ("conditioned", "ple"):
        cfg = tiny_config(arch, epochs=2)
        cfg.train.num_threads = 1
        res = fit(cfg, load_dataset(cfg))
        assert res.history[-1]["train/loss"] < res.history[0]["train/loss"], arch


# -- hooks every arch implements ---------------------------------------------------------------------


VARIANTS = [(a, {}) for a in ARCHS] + [("ple", {"levels": 3})]


@pytest.mark.parametrize(("arch", "kw"), VARIANTS, ids=[f"{a}{kw or ''}" for a, kw in VARIANTS])
def test_shared_representation_and_shared_parameters(arch, kw):
    # wide layers and a fixed draw: a 4-unit tower can start with every ReLU dead on the batch,
    # which reads as "no gradient reaches z" although the wiring is right
    torch.manual_seed(0)
    wide = dict(bottom_dims=[32, 24], expert_dims=[32], tower_dims=[32])
    net = build_model(_model_cfg(arch, **{**wide, **kw}), _schema(), TASKS)
    net.eval()
    cats, nums = _batch(32)
    out, z = net.forward_with_shared(cats, nums)
    torch.testing.assert_close(out["engagement"], net(cats, nums)["engagement"])
    for t in ("engagement", "satisfaction"):  # every output is computed from z
        (g,) = torch.autograd.grad(out[t].sum(), z, retain_graph=True)
        assert g.abs().sum() > 0, t
    # shared_parameters() is exactly the parameters with an entry both tasks' outputs reach
    # (Conditioned's task embedding is not: each task reaches its own row)
    params = dict(net.named_parameters())
    reach = [
        [
            torch.zeros_like(p, dtype=torch.bool) if g is None else g != 0
            for p, g in zip(
                params.values(),
                torch.autograd.grad(
                    out[t].sum(), list(params.values()), retain_graph=True, allow_unused=True
                ),
                strict=True,
            )
        ]
        for t in ("engagement", "satisfaction")
    ]
    both = {n for n, a, b in zip(params, *reach, strict=True) if bool((a & b).any())}
    shared_ids = {id(p) for p in net.shared_parameters()}
    assert {n for n, p in params.items() if id(p) in shared_ids} == both
    assert (not shared_ids) == (arch == "separate")
    last = net.last_shared_parameters()
    assert (len(last) == 0) == (arch == "separate")
    assert all(id(p) in shared_ids for p in last)
    # MGDA-UB's premise where claimed: a shared parameter's gradient flows through z alone
    if net.z_bounds_shared and shared_ids:
        shared = net.shared_parameters()
        for t in ("engagement", "satisfaction"):
            direct = torch.autograd.grad(out[t].sum(), shared, retain_graph=True)
            (dz,) = torch.autograd.grad(out[t].sum(), z, retain_graph=True)
            via_z = torch.autograd.grad(z, shared, grad_outputs=dz, retain_graph=True)
            for a, b in zip(direct, via_z, strict=True):
                torch.testing.assert_close(a, b)
    assert net.z_bounds_shared == (arch not in ("ple", "conditioned"))


@pytest.mark.parametrize("arch", ARCHS)
def test_param_depths_and_layer_lr_decay(arch):
    net = build_model(_model_cfg(arch), _schema(), TASKS)
    depths = net.param_depths()
    assert set(depths) == {n for n, _ in net.named_parameters()}
    heads = [n for n in depths if n.startswith(("towers.", "head.", "task_emb"))]
    assert heads and all(depths[n] == 0 for n in heads)
    deepest = max(depths.values())
    assert all(depths[n] == deepest for n in depths if n.startswith("embed."))
    assert deepest >= 2
    cfg = tiny_config(arch).train
    cfg.lr, cfg.lr_scale, cfg.layer_lr_decay = 0.01, 0.5, 0.5
    groups = param_groups(net, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in net.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.005 * 0.5 ** depths[name]), name


def test_a_parameter_without_a_declared_depth_is_an_error():
    net = build_model(_model_cfg("mmoe"), _schema(), TASKS)
    net.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="no depth declared for parameter 'extra'"):
        net.param_depths()


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_weight_decay_applies_to_the_embedding_tables_only(arch):
    net = build_model(_model_cfg(arch), _schema(), TASKS)
    tables = [m.weight for m in net.modules() if isinstance(m, torch.nn.Embedding)]
    assert tables
    cfg = tiny_config(arch).train
    cfg.weight_decay, cfg.embed_weight_decay, cfg.layer_lr_decay = 1e-5, 3e-3, 0.5
    groups = param_groups(net, cfg)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(decay_of) == sum(1 for p in net.parameters() if p.requires_grad)  # each once
    table_ids = {id(t) for t in tables}
    for p in net.parameters():
        assert decay_of[id(p)] == (3e-3 if id(p) in table_ids else 1e-5)
    cfg.embed_weight_decay = None  # unset: the tables follow weight_decay
    assert {g["weight_decay"] for g in param_groups(net, cfg)} == {1e-5}


@pytest.mark.parametrize(
    ("key", "strength", "factor"), [("embed_weight_decay", 0.05, 0.8), ("embed_batch_l2", 1.0, 0.9)]
)
@pytest.mark.slow
def test_embedding_regularisers_shrink_the_embeddings_in_training(key, strength, factor):
    """Either regulariser alone (the other off) against none; a negative strength is refused."""
    norms = {}
    for value in (0.0, strength):
        cfg = tiny_config("mmoe", epochs=2)
        cfg.train.num_threads, cfg.train.embed_weight_decay = 1, 0.0
        setattr(cfg.train, key, value)
        res = fit(cfg, load_dataset(cfg))
        norms[value] = float(res.model.embed.emb.weight.detach().norm())
    assert norms[strength] < factor * norms[0.0]
    cfg = tiny_config()
    setattr(cfg.train, key, -0.1)
    with pytest.raises(ConfigError, match=key):
        cfg.validated()


@pytest.mark.parametrize("arch", ["separate", "mmoe"])
def test_batch_embedding_l2_penalises_the_batch_rows_by_inverse_count(arch):
    """DIN's mini-batch aware L2: sum over the rows the batch uses of ||w_j||^2 / n_j (every
    serving embedding table: one per task for separate towers); other rows get no gradient."""
    net = build_model(_model_cfg(arch), _schema(), TASKS)
    train_cats, _ = _batch(200, seed=1)
    counts = embedding_row_counts(net, train_cats.numpy())
    embeds = net.feature_embeddings()
    assert len(embeds) == (2 if arch == "separate" else 1)
    e = embeds[0]
    assert counts.sum().item() == train_cats.numel() and len(counts) == e.emb.num_embeddings
    col = 1  # field 1's value v lives in row offsets[1] + v
    assert counts[e.offsets[col] + 7].item() == (train_cats[:, col] == 7).sum().item()
    cats, _ = _batch(8, seed=2)
    rows = torch.unique(cats + e.offsets)
    want = sum(
        float((m.emb.weight[rows].detach().pow(2).sum(1) / counts[rows].clamp_min(1)).sum()) for m in embeds
    )
    penalty = batch_embedding_l2(net, cats, counts)
    assert penalty.item() == pytest.approx(want, rel=1e-5)
    penalty.backward()
    grad = e.emb.weight.grad
    used = torch.zeros(e.emb.num_embeddings, dtype=torch.bool)
    used[rows] = True
    assert grad[~used].abs().sum().item() == 0.0 and grad[used].abs().sum().item() > 0
    # d/dw_j of ||w_j||^2 / n_j is 2 w_j / n_j
    j = int(rows[0])
    torch.testing.assert_close(grad[j], 2 * e.emb.weight[j].detach() / counts[j].clamp_min(1))


@pytest.mark.parametrize("arch", ["separate", "mmoe"])
def test_unknown_rows_are_the_trained_rows_mean_when_training_never_used_them(arch):
    """Row 0 ("unknown": a new user / video, a missing value at serving) of a feature no training
    row maps to 0 becomes the count-weighted mean of the feature's other rows; a row 0 that training
    did use (rare values folded into it) is left as trained."""
    net = build_model(_model_cfg(arch), _schema(), TASKS)
    train_cats = np.array([[1, 0, 1], [1, 5, 2], [3, 5, 2], [3, 7, 1]], dtype=np.int64)  # video_id 0 seen
    counts = embedding_row_counts(net, train_cats)
    e = net.feature_embeddings()[0]
    w = e.emb.weight.detach().clone()
    user0, video0, device0 = (int(o) for o in e.offsets)
    want_user0 = (2 * w[user0 + 1] + 2 * w[user0 + 3]) / 4  # user 1 twice, user 3 twice
    with unknown_rows_imputed(net, counts):
        torch.testing.assert_close(e.emb.weight[user0], want_user0)
        torch.testing.assert_close(e.emb.weight[device0], (2 * w[device0 + 1] + 2 * w[device0 + 2]) / 4)
        torch.testing.assert_close(e.emb.weight[video0], w[video0])  # trained: left alone
    torch.testing.assert_close(e.emb.weight, w)  # restored after the block
    assert impute_unknown_rows(net, counts) == 2 * len(net.feature_embeddings())
    for m in net.feature_embeddings():  # every table (one per task for separate towers)
        mw = m.emb.weight
        torch.testing.assert_close(mw[user0], (mw[user0 + 1] + mw[user0 + 3]) / 2)


def test_fit_serves_imputed_unknown_rows():
    cfg = tiny_config("mmoe", epochs=1)
    cfg.train.num_threads = 1
    ds = load_dataset(cfg)
    res = fit(cfg, ds)
    counts = embedding_row_counts(res.model, ds.train.cats)
    e = res.model.feature_embeddings()[0]
    unseen = [int(o) for o in e.offsets if counts[int(o)] == 0]
    assert res.metrics["unknown_rows_imputed"] == len(unseen) > 0
    for r in unseen:  # the model fit returns (and the checkpoint stores) holds the filled rows
        assert e.emb.weight[r].abs().sum() > 0


def test_unknown_dropout_blanks_whole_user_or_video_groups_to_the_serving_defaults():
    schema = _schema()  # user: user_id; video: video_id, dur; context: device
    groups = entity_columns(schema)
    assert groups == [(slice(0, 1), slice(0, 0)), (slice(1, 2), slice(0, 1))]
    cats = torch.tensor([[3, 7, 1]]).repeat(4000, 1)
    nums = torch.full((4000, 1), 0.5)
    c, x = drop_to_unknown(cats, nums, groups, 0.25, torch.Generator().manual_seed(0))
    user_dropped, video_dropped = c[:, 0] == 0, c[:, 1] == 0
    assert abs(float(user_dropped.float().mean()) - 0.25) < 0.03  # each group on its own
    assert abs(float(video_dropped.float().mean()) - 0.25) < 0.03
    assert abs(float((user_dropped & video_dropped).float().mean()) - 0.0625) < 0.02
    assert torch.equal(x[:, 0] == 0.0, video_dropped)  # the video's numerics go with its categoricals
    assert (c[:, 2] == 1).all() and (cats[:, 0] == 3).all()  # context untouched; the input is not modified


def test_unknown_dropout_trains_the_unknown_rows_instead_of_imputing_them():
    cfg = tiny_config("mmoe", epochs=1)
    cfg.train.num_threads, cfg.train.unknown_dropout = 1, 0.2
    cfg.train.weight_decay = cfg.train.embed_weight_decay = 0.0  # only data gradients move a row
    ds = load_dataset(cfg)
    res = fit(cfg, ds)
    assert "unknown_rows_imputed" not in res.metrics
    e = res.model.feature_embeddings()[0]
    counts = embedding_row_counts(res.model, ds.train.cats)
    user0 = int(e.offsets[0])
    assert counts[user0] == 0  # no logged row is an unknown user ...
    torch.manual_seed(cfg.train.seed)  # the initial weights fit started from
    start = build_model(cfg.model, ds.schema, cfg.tasks).feature_embeddings()[0].emb.weight[user0]
    moved = float((e.emb.weight[user0] - start).detach().norm())
    assert moved > 0.1 * float(start.detach().norm())  # ... yet its row moved in training
    bad = tiny_config("mmoe")
    bad.train.unknown_dropout = 1.0
    with pytest.raises(ConfigError, match="unknown_dropout"):
        bad.validated()


# -- soft parameter sharing -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["separate", "shared_bottom", "mmoe", "ple"])
def test_tower_l2_is_zero_for_identical_towers(arch):
    net = build_model(_model_cfg(arch), _schema(), TASKS)
    towers = net.task_towers()
    assert set(towers) == {"engagement", "satisfaction"}
    assert tower_l2_penalty(net).item() > 0  # independently initialised
    towers["satisfaction"].load_state_dict(copy.deepcopy(towers["engagement"].state_dict()))
    assert tower_l2_penalty(net).item() == 0.0
    sat = towers["satisfaction"]
    with torch.no_grad():
        (sat[2] if arch == "separate" else sat).out.weight[0, 0] += 0.5
    assert tower_l2_penalty(net).item() == pytest.approx(0.25)


def test_tower_l2_needs_towers_and_skips_frozen_ones():
    cfg = tiny_config("conditioned")
    cfg.train.tower_l2 = 0.1
    with pytest.raises(ConfigError, match="no per-task towers"):
        cfg.validated()
    cfg = tiny_config("shared_bottom", epochs=1)  # every tower frozen: nothing to tie, no crash
    cfg.train.num_threads, cfg.train.tower_l2, cfg.train.freeze = 1, 0.1, ["towers"]
    res = fit(cfg, load_dataset(cfg))
    assert math.isfinite(res.metrics["test/engagement/auc"])


@pytest.mark.slow
def test_tower_l2_pulls_towers_together():
    dist = {}
    for lam in (0.0, 1.0):
        cfg = tiny_config("shared_bottom", epochs=2)
        cfg.train.num_threads, cfg.train.tower_l2, cfg.train.lr = 1, lam, 0.01
        res = fit(cfg, load_dataset(cfg))
        dist[lam] = tower_l2_penalty(res.model).item()
    assert dist[1.0] < 0.5 * dist[0.0]


# -- position / selection bias -----------------------------------------------------------------------


def test_bias_tower_adds_to_bias_tasks_only_and_is_served_at_unknown(tmp_path):
    """Training adds the tower on the logged bias features; evaluation and serving add its output
    for all-unknown features (YouTube: position treated as missing), the value feature dropout
    trains, so the intercept's split between the tower and the main network does not matter."""
    cfg = tiny_config("mmoe")
    cfg.model = _model_cfg("mmoe", bias_features=["position", "device"], bias_tasks=["engagement"])
    schema = _schema(bias=True)
    assert schema.columns("context") == (["device"], [])  # the bias features are not served
    assert schema.n_cats == 3 and [f.name for f in schema.bias] == ["position", "device"]
    net = build_model(cfg.model, schema, cfg.tasks)
    net.eval()
    cats, nums = _batch(20)
    bias = torch.stack([torch.randint(0, 11, (20,)), torch.randint(0, 3, (20,))], 1)
    plain, biased = net(cats, nums), net(cats, nums, bias)
    assert net.bias_tower is not None
    unknown = net.bias_tower(torch.zeros(1, 2, dtype=torch.long))[0, 0]
    assert abs(float(unknown.detach())) > 1e-4  # a real shift, not a zero by construction
    main = net.forward_tasks(cats, nums)[0]
    torch.testing.assert_close(plain["engagement"], main["engagement"] + unknown)
    torch.testing.assert_close(
        biased["engagement"] - plain["engagement"], net.bias_tower(bias)[:, 0] - unknown
    )
    torch.testing.assert_close(biased["satisfaction"], plain["satisfaction"])
    torch.testing.assert_close(plain["satisfaction"], main["satisfaction"])
    # checkpoint round trip; the Ranker scores user / video / context rows only, without the tower
    path = save_checkpoint(tmp_path, net, cfg, schema)
    ranker = Ranker.load(path)
    assert ranker.schema.to_dict() == schema.to_dict()
    heads = ranker.score(
        schema.canonicalize_records("user", [{"user_id": 3}]),
        schema.canonicalize_records("video", [{"video_id": i, "dur": 1.0} for i in range(5)]),
        schema.canonicalize_records("context", [{"device": "a", "position": 1}]),
    )
    c, x = ranker.encode(
        schema.canonicalize_records("user", [{"user_id": 3}]),
        schema.canonicalize_records("video", [{"video_id": i, "dur": 1.0} for i in range(5)]),
        schema.canonicalize_records("context", [{"device": "a"}]),
    )
    with torch.no_grad():
        want = torch.sigmoid(net(torch.from_numpy(c), torch.from_numpy(x))["engagement"]).numpy()
    assert heads["engagement"] == pytest.approx(want, rel=1e-6)


def test_bias_feature_dropout_blanks_whole_rows():
    net = build_model(
        _model_cfg("mmoe", bias_features=["position", "device"], bias_dropout=0.5), _schema(True), TASKS
    )
    tower = net.bias_tower
    assert tower is not None
    bias = torch.stack([torch.randint(1, 11, (4000,)), torch.randint(1, 3, (4000,))], 1)
    tower.eval()
    unknown = tower(torch.zeros(1, 2, dtype=torch.long))[0, 0]
    tower.train()
    torch.manual_seed(0)
    y = tower(bias)[:, 0]
    frac = (y == unknown).float().mean().item()
    assert 0.45 < frac < 0.55


def test_bias_config_is_validated():
    cfg = tiny_config()
    cfg.model.bias_features = ["position"]
    cfg.model.bias_tasks = ["watch_time"]
    with pytest.raises(ConfigError, match="bias_tasks"):
        cfg.validated()


def test_bias_tasks_default_to_the_first_configured_task():
    tasks = [TaskConfig("clicked", "binary", "long_view"), TaskConfig("liked", "binary", "is_like")]
    net = build_model(_model_cfg("mmoe", bias_features=["position", "device"]), _schema(True), tasks)
    assert net.bias_tower is not None and net.bias_tower.tasks == ["clicked"]


@pytest.mark.slow
def test_bias_tower_learns_position_bias_on_synthetic_log(tmp_path):
    """The YouTube-like log's click logit falls with ln(position): the learned bias logit must too."""
    make_youtube_log(tmp_path, n_users=300, n_videos=200, n_impressions=20000, seed=0)
    cfg = load_config("configs/synth_youtube_mmoe.toml")
    cfg.data.data_dir = str(tmp_path)
    cfg.model.bias_features = ["position", "device"]
    assert isinstance(cfg.model.net, MMoEConfig)
    cfg.model.embed_dim, cfg.model.net.expert_dims, cfg.model.tower_dims = 8, [16], [8]
    cfg = cfg.validated()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.num_threads = 3, 512, 1
    ds = load_dataset(cfg)
    assert ds.train.bias is not None and ds.train.bias.shape == (len(ds.train), 2)
    assert ds.schema.n_cats == ds.train.cats.shape[1]  # bias features are not model inputs
    res = fit(cfg, ds)
    tower = res.model.bias_tower
    assert tower is not None
    tower.eval()
    pos, dev = ds.schema.bias
    assert pos.vocab == [str(i) for i in range(1, 11)]
    for device in dev.vocab or []:
        rows = np.array(
            [
                [
                    pos.encode_codes(np.array([stable_hash(p)]))[0],
                    dev.encode_codes(np.array([stable_hash(device)]))[0],
                ]
                for p in (1, 2, 5, 10)
            ]
        )
        with torch.no_grad():
            logit = tower(torch.from_numpy(rows))[:, 0].numpy()
        assert logit[0] > logit[1] > logit[3], (device, logit)
        assert logit[0] - logit[3] > 0.2, (device, logit)
    # evaluation scores rows as served (no bias inputs): predictions ignore the logged positions
    heads = predict(res.model, ds.test, cfg.tasks)
    assert all(np.isfinite(v).all() for v in heads.values())
    assert math.isfinite(res.metrics["test/engagement/auc"])


def test_bias_checkpoint_round_trip_and_fine_tune_reuses_bias_vocab(tmp_path):
    make_youtube_log(tmp_path / "d", n_users=100, n_videos=50, n_impressions=3000, seed=1)
    cfg = load_config("configs/synth_youtube_mmoe.toml")
    cfg.data.data_dir = str(tmp_path / "d")
    cfg.model.bias_features = ["position", "device"]
    assert isinstance(cfg.model.net, MMoEConfig)
    cfg.model.embed_dim, cfg.model.net.expert_dims, cfg.model.tower_dims = 4, [8], [4]
    cfg = cfg.validated()
    cfg.train.epochs, cfg.train.num_threads = 1, 1
    ds = load_dataset(cfg)
    res = fit(cfg, ds)
    path = save_checkpoint(tmp_path / "art", res.model, cfg, ds.schema)
    ckpt = load_checkpoint(path)
    assert [f.name for f in ckpt.schema.bias] == ["position", "device"]
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, ckpt.model.state_dict()[k]), k
    again = load_dataset(cfg, schema=ckpt.schema)
    assert again.schema.to_dict() == ckpt.schema.to_dict()
    assert np.array_equal(again.train.bias, ds.train.bias)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_round_trips_through_a_checkpoint(arch, tmp_path):
    cfg = tiny_config(arch)
    cfg.model = _model_cfg(
        arch, **{"conditioned": {"conditioning": "film"}, "ple": {"levels": 2}}.get(arch, {})
    )
    net = build_model(cfg.model, _schema(), cfg.tasks)
    ckpt = load_checkpoint(save_checkpoint(tmp_path, net, cfg, _schema()))
    net.eval()
    cats, nums = _batch(8)
    with torch.no_grad():
        a, b = net(cats, nums), ckpt.model(cats, nums)
    for t in a:
        assert torch.equal(a[t], b[t])
