import math

import pytest
import torch
from modelkit import model_config

from model.config import MMoEConfig, ModelConfig, SeparateConfig, TaskConfig
from model.features import FeatureSchema, FeatureSpec, SequenceSpec
from model.nets import MMoE, SeparateTowers, build_model
from model.train import observed_tasks, task_losses

TASKS = [TaskConfig("engagement", "binary", "long_view"), TaskConfig("satisfaction", "binary", "is_like")]


def _schema() -> FeatureSchema:
    return FeatureSchema(
        [
            FeatureSpec("user_id", "user", "categorical", vocab=[str(i) for i in range(10)]),
            FeatureSpec("video_id", "video", "categorical", vocab=[str(i) for i in range(20)]),
            FeatureSpec("dur", "video", "numeric"),
            FeatureSpec("tab", "context", "categorical", vocab=["0", "1"]),
        ]
    )


def _batch(b: int = 32):
    g = torch.Generator().manual_seed(0)
    cats = torch.stack(
        [
            torch.randint(0, 11, (b,), generator=g),
            torch.randint(0, 21, (b,), generator=g),
            torch.randint(0, 3, (b,), generator=g),
        ],
        dim=1,
    )
    return cats, torch.randn(b, 1, generator=g)


@pytest.mark.parametrize("arch", ["separate", "shared_bottom", "mmoe"])
def test_forward_returns_one_output_per_task(arch):
    net = build_model(
        model_config(arch, embed_dim=4, expert_dims=[8], bottom_dims=[8], tower_dims=[4]),
        _schema(),
        TASKS,
    )
    out = net(*_batch(32))
    assert set(out) == {"engagement", "satisfaction"}
    assert all(v.shape == (32,) and torch.isfinite(v).all() for v in out.values())


def test_mmoe_gates_are_distributions_and_gate_dropout_keeps_an_expert():
    cfg = ModelConfig(
        net=MMoEConfig(n_experts=3, expert_dims=[8], gate_dropout=0.9), embed_dim=4, tower_dims=[4]
    )
    net = build_model(cfg, _schema(), TASKS)
    assert isinstance(net, MMoE)
    cats, nums = _batch(256)
    net.eval()
    g = net.gate_weights(cats, nums)  # (B, T, E)
    assert g.shape == (256, 2, 3)
    torch.testing.assert_close(g.sum(-1), torch.ones(256, 2))
    net.train()
    probs = net.gate_probs(net.embed(cats, nums))
    for p in probs.values():
        assert torch.isfinite(p).all()  # never all experts dropped (no NaN softmax)
        assert ((p == 0).sum(-1) >= 1).float().mean() > 0.5  # 0.9 dropout really drops experts
        torch.testing.assert_close(p.sum(-1), torch.ones(256))


def test_separate_towers_share_nothing():
    net = build_model(
        ModelConfig(net=SeparateConfig(bottom_dims=[8]), embed_dim=4, tower_dims=[4]), _schema(), TASKS
    )
    assert isinstance(net, SeparateTowers)
    out = net(*_batch(16))
    out["engagement"].sum().backward()
    for name, p in net.named_parameters():
        if "satisfaction" in name:
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_masked_losses_are_count_normalised():
    out = {"engagement": torch.zeros(4), "satisfaction": torch.zeros(4)}
    labels = torch.tensor([[1.0, float("nan")], [0.0, float("nan")], [1.0, 1.0], [0.0, float("nan")]])
    losses = task_losses(out, labels, TASKS)
    assert losses["engagement"].item() == pytest.approx(math.log(2))  # mean over 4 rows
    assert losses["satisfaction"].item() == pytest.approx(math.log(2))  # mean over its 1 observed row
    all_missing = torch.full((4, 2), float("nan"))
    assert task_losses(out, all_missing, TASKS)["satisfaction"].item() == 0.0
    assert observed_tasks(all_missing).tolist() == [False, False]
    assert observed_tasks(labels).tolist() == [True, True]


def _request_schema(histories_and_bias: bool = False) -> FeatureSchema:
    """Categoricals and numerics in every group; optionally two histories (attention and mean
    pooled) and two bias features."""
    specs = [
        FeatureSpec("user_id", "user", "categorical", vocab=[str(i) for i in range(10)]),
        FeatureSpec("fans", "user", "numeric"),
        FeatureSpec("video_id", "video", "categorical", vocab=[str(i) for i in range(20)]),
        FeatureSpec("author", "video", "categorical", vocab=[str(i) for i in range(5)]),
        FeatureSpec("dur", "video", "numeric"),
        FeatureSpec("tab", "context", "categorical", vocab=["0", "1"]),
        FeatureSpec("age", "context", "numeric"),
    ]
    if not histories_and_bias:
        return FeatureSchema(specs)
    specs += [
        FeatureSpec("position", "bias", "categorical", vocab=[str(i) for i in range(1, 6)]),
        FeatureSpec("device", "bias", "categorical", vocab=["a", "b"]),
    ]
    sequences = [
        SequenceSpec("views", ["long_view"], 6, "attention", ["video_id", "author"]),
        SequenceSpec("likes", ["is_like"], 3, "mean", ["video_id"]),
    ]
    return FeatureSchema(specs, sequences=sequences)


EVERY_ARCH = [
    ("separate", {}),
    ("shared_bottom", {}),
    ("mmoe", {}),
    ("ple", {"levels": 1}),
    ("ple", {"levels": 2}),
    ("conditioned", {"conditioning": "concat"}),
    ("conditioned", {"conditioning": "add"}),
    ("conditioned", {"conditioning": "film"}),
]


@pytest.mark.parametrize(("arch", "extra"), EVERY_ARCH)
def test_forward_request_equals_forward_on_the_broadcast_request(arch, extra, monkeypatch):
    """Serving computes the user/context share of the first layer once; outputs must not change."""
    from model.nets import RequestBatch

    cfg = model_config(arch, embed_dim=4, expert_dims=[8, 8], bottom_dims=[8, 8], tower_dims=[4], **extra)
    net = build_model(cfg, _request_schema(), TASKS).eval()
    g = torch.Generator().manual_seed(1)
    b = 37
    r = RequestBatch(
        user_cats=torch.tensor([[3]]),
        video_cats=torch.stack(
            [torch.randint(0, 21, (b,), generator=g), torch.randint(0, 6, (b,), generator=g)], 1
        ),
        context_cats=torch.tensor([[1]]),
        user_nums=torch.randn(1, 1, generator=g),
        video_nums=torch.randn(b, 1, generator=g),
        context_nums=torch.randn(1, 1, generator=g),
    )
    with torch.no_grad():
        for p in net.parameters():  # away from the init (FiLM starts at the identity, biases at 0)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        full = net(*r.full())
        # every arch takes the split path: the (B, D) broadcast of the request is never built
        monkeypatch.setattr(RequestBatch, "full", lambda self: pytest.fail("broadcast the request"))
        fast = net.forward_request(r)
    for t in full:
        torch.testing.assert_close(fast[t], full[t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("arch", "extra"), EVERY_ARCH)
def test_the_request_split_equals_the_broadcast_path_with_histories_and_bias(arch, extra, monkeypatch):
    """``MultiTaskNet.request_tasks`` on an architecture's declared first layers (the split) gives
    what the same net gives served without them (the request broadcast to B rows, run through
    ``forward_tasks``), with histories and the bias tower."""
    from model.compiled import probe_request

    cfg = model_config(
        arch,
        embed_dim=4,
        expert_dims=[8, 6],
        bottom_dims=[8, 6],
        tower_dims=[4],
        bias_features=["position", "device"],
        bias_dims=[4],
        **extra,
    )
    schema = _request_schema(histories_and_bias=True)
    net = build_model(cfg, schema, TASKS).eval()
    assert net.bias_tower is not None and net.first_layers()  # the arch opts into the split
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():  # away from the init (FiLM starts at the identity, biases at 0)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for b in (1, 2, 23):
            r = probe_request(schema, b, g)
            split = net.forward_request(r)
            with monkeypatch.context() as m:
                m.setattr(net, "first_layers", list)  # no first layers declared: the broadcast path
                plain = net.forward_request(r)
            assert set(split) == set(plain) == {t.name for t in TASKS}
            for t in plain:
                assert split[t].shape == (b,)
                torch.testing.assert_close(split[t], plain[t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["separate", "shared_bottom"])
def test_a_net_without_a_first_layer_serves_the_broadcast_request(arch):
    """No bottom layer: nothing to split, ``first_layers`` is empty and the request is broadcast."""
    from model.compiled import probe_request

    cfg = model_config(arch, embed_dim=4, bottom_dims=[], tower_dims=[4])
    schema = _request_schema(histories_and_bias=True)
    net = build_model(cfg, schema, TASKS).eval()
    assert net.first_layers() == []
    r = probe_request(schema, 5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = net.forward_request(r), net(*r.full(), None, r.full_history())
    for t in want:
        torch.testing.assert_close(got[t], want[t])


@pytest.mark.parametrize("module", ["mmoe", "ple", "shared_bottom", "separate", "conditioned"])
def test_each_architectures_docstring_example_runs(module: str) -> None:
    import doctest
    import importlib

    mod = importlib.import_module(f"model.nets.{module}")
    result = doctest.testmod(mod, raise_on_error=False, verbose=False)
    assert result.attempted >= 5 and result.failed == 0, result
