"""Task weighting schemes (model.weighting): the maths on hand-made inputs, then real training."""

import math

import numpy as np
import pydantic
import pytest
import torch
from modelkit import tiny_config

from model.config import (
    Config,
    ConfigError,
    GradNormConfig,
    MMoEConfig,
    ModelConfig,
    PlainWeighting,
    SeparateConfig,
    SharedBottomConfig,
    TaskConfig,
    TrainConfig,
    WeightingConfig,
    WorstCaseConfig,
    apply_overrides,
)
from model.data import load_dataset
from model.features import FeatureSchema, FeatureSpec
from model.nets import build_model
from model.train import fit, observed_tasks, task_losses
from model.weighting import (
    GradNormWeighting,
    PCGradWeighting,
    UncertaintyWeighting,
    WorstCaseWeighting,
    constant_predictor_losses,
    make_weighting,
    min_norm_coefficients,
    pcgrad_project,
    uncertainty_objective,
)

TASKS = [TaskConfig("engagement", "binary", "long_view"), TaskConfig("satisfaction", "binary", "is_like")]


@pytest.fixture(scope="module")
def ds():
    return load_dataset(tiny_config())


def _weighting(kind: str, **keys) -> WeightingConfig:
    """``train.weighting`` ``kind`` with its own keys (``[train.weighting.<kind>]``)."""
    if kind == "worst_case":
        return WorstCaseConfig(**keys)
    if kind == "gradnorm":
        return GradNormConfig(**keys)
    assert not keys, f"{kind} has no keys of its own"
    return PlainWeighting(kind)  # type: ignore[arg-type]


def _cfg(arch: str = "mmoe", epochs: int = 3, weighting: str | WeightingConfig = "static", **train):
    cfg = tiny_config(arch, epochs=epochs)
    cfg.train.num_threads = 1  # 2 shared cores: one thread is much faster than two fighting
    cfg.train.weighting = _weighting(weighting) if isinstance(weighting, str) else weighting
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg.validated()


# -- uncertainty ---------------------------------------------------------------------------------


def test_uncertainty_objective_per_kind():
    losses = torch.tensor([0.5, 2.0])
    s = torch.tensor([0.3, -0.2])
    got = uncertainty_objective(losses, s, ["binary", "regression"])
    want = (math.exp(-0.3) * 0.5 + 0.5 * 0.3) + (0.5 * math.exp(0.2) * 2.0 + 0.5 * -0.2)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # for fixed L the optimal s solves exp(-s) = 2 c L: c = 1 (binary), 1/2 (regression)
    for kind, c in (("binary", 1.0), ("regression", 0.5)):
        L = torch.tensor([0.7])
        s_opt = torch.tensor([math.log(2 * c * 0.7)], requires_grad=True)
        (g,) = torch.autograd.grad(uncertainty_objective(L, s_opt, [kind]), s_opt)
        assert abs(g.item()) < 1e-6, kind
    w = UncertaintyWeighting(
        [TaskConfig("a", "binary"), TaskConfig("b", "regression", label="x")]
    )  # effective weights c_i exp(-s_i) at s = 0
    w.objective(torch.tensor([1.0, 1.0]))
    assert w.weights() == {"a": pytest.approx(1.0), "b": pytest.approx(0.5)}


def test_uncertainty_log_variances_are_learned(ds):
    res = fit(_cfg(weighting="uncertainty"), ds)
    last = res.history[-1]
    # both s_i moved away from their initial 0, and the reported weights are c_i * exp(-s_i)
    for t in ("engagement", "satisfaction"):
        s = last[f"log_var/{t}"]
        assert abs(s) > 1e-3
        assert res.metrics["task_weights"][t] == pytest.approx(math.exp(-s), rel=0.05)
        assert "log_vars" not in " ".join(res.model.state_dict())  # not part of the served model


# -- MGDA ---------------------------------------------------------------------------------------


def _norm2(alpha: torch.Tensor, g: torch.Tensor) -> float:
    return float((alpha @ g).pow(2).sum())


@pytest.mark.parametrize("seed", range(6))
def test_mgda_two_task_closed_form_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    if seed == 4:
        g[1] = 3.0 * g[0]  # aligned, one longer: the min-norm point is the shorter one (clip)
    if seed == 5:
        g[1] = -0.5 * g[0]  # opposed: the min-norm point is the origin
    alpha = min_norm_coefficients(g)
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    norms = torch.stack([((a * g[0] + (1 - a) * g[1]) ** 2).sum() for a in grid])
    best = grid[int(torch.argmin(norms))]
    assert alpha[0].item() == pytest.approx(best.item(), abs=1e-4)
    assert _norm2(alpha, g) <= float(norms.min()) + 1e-12  # no point of the grid is lower
    # the formula of the paper, clipped to [0, 1]
    a = float(((g[1] - g[0]) @ g[1]) / ((g[0] - g[1]) ** 2).sum())
    assert alpha[0].item() == pytest.approx(min(max(a, 0.0), 1.0), abs=1e-12)


@pytest.mark.parametrize(("seed", "dim"), [(0, 5), (1, 5), (3, 5), (0, 2), (4, 2)])
def test_mgda_frank_wolfe_three_tasks_matches_simplex_search(seed, dim):
    g = torch.randn(3, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    alpha = min_norm_coefficients(g)
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()
    a, b = np.meshgrid(np.linspace(0, 1, 801), np.linspace(0, 1, 801))
    inside = a + b <= 1
    grid = np.stack([a[inside], b[inside], 1 - a[inside] - b[inside]], axis=1)  # points of the simplex
    brute = float(((grid @ g.numpy()) ** 2).sum(axis=1).min())
    assert _norm2(alpha, g) <= brute + 1e-9


# -- PCGrad -------------------------------------------------------------------------------------


def test_pcgrad_removes_the_conflicting_component():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1 < 0
    p = pcgrad_project(g)
    assert p[0] @ g[1] >= -1e-7 and p[1] @ g[0] >= -1e-7
    torch.testing.assert_close(p[0], torch.tensor([0.5, 0.5]))  # g1 minus its projection on g2
    torch.testing.assert_close(p[1], torch.tensor([0.0, 1.0]))
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # no conflict: untouched
    torch.testing.assert_close(pcgrad_project(agree), agree)


def test_pcgrad_writes_projected_sum_on_shared_and_plain_grads_elsewhere():
    schema = FeatureSchema(
        [
            FeatureSpec("u", "user", "categorical", vocab=[str(i) for i in range(5)]),
            FeatureSpec("x", "video", "numeric"),
        ]
    )
    net = build_model(
        ModelConfig(net=SharedBottomConfig(bottom_dims=[6]), embed_dim=3, tower_dims=[4]), schema, TASKS
    )
    net.eval()
    gen = torch.Generator().manual_seed(0)
    cats, nums = torch.randint(0, 6, (64, 1), generator=gen), torch.randn(64, 1, generator=gen)
    labels = torch.stack(
        [torch.rand(64, generator=gen) < 0.3, torch.rand(64, generator=gen) < 0.8], 1
    ).float()
    out, z = net.forward_with_shared(cats, nums)
    losses = task_losses(out, labels, TASKS)
    shared = net.shared_parameters()
    per_task = [torch.autograd.grad(losses[t.name], shared, retain_graph=True) for t in TASKS]
    flat = torch.stack([torch.cat([g.flatten() for g in gs]) for gs in per_task])
    want = pcgrad_project(flat).sum(0)
    PCGradWeighting(TASKS).backward(losses, z, net)
    got = torch.cat([p.grad.flatten() for p in shared])
    torch.testing.assert_close(got, want)
    # a tower parameter only sees its own task
    eng_out = net.towers["engagement"].out.weight
    (want_tower,) = torch.autograd.grad(task_losses(net(cats, nums), labels, TASKS)["engagement"], eng_out)
    torch.testing.assert_close(eng_out.grad, want_tower)


# -- GradNorm / worst case ------------------------------------------------------------------------


def test_gradnorm_weights_stay_positive_and_sum_to_t(ds):
    seen = []

    def progress(kind, info):
        if kind == "step":
            seen.append(info["weights"])

    res = fit(_cfg(weighting=GradNormConfig(lr=0.05)), ds, progress)
    assert seen
    for w in seen:
        assert all(v > 0 for v in w.values())
        assert sum(w.values()) == pytest.approx(2.0, abs=1e-5)
    assert abs(seen[-1]["engagement"] - 1.0) > 0.05  # the weights really adapt
    assert sum(res.metrics["task_weights"].values()) == pytest.approx(2.0, abs=1e-5)


def test_gradnorm_moves_weight_towards_the_task_with_smaller_gradients():
    w = GradNormWeighting(TASKS, alpha=0.0, lr=0.1, reference=[1.0, 1.0])
    # a "model" whose last shared parameter gets gradient 10x larger from engagement than satisfaction
    theta = torch.nn.Parameter(torch.ones(3))

    class Toy(torch.nn.Module):
        def last_shared_parameters(self):
            return [theta]

    for _ in range(30):
        losses = {"engagement": (10 * theta).sum(), "satisfaction": theta.sum()}
        w.backward(losses, theta, Toy())
        w.after_step()
    assert w.weights()["satisfaction"] > 1.5 > w.weights()["engagement"] > 0
    assert sum(w.weights().values()) == pytest.approx(2.0)


def test_worst_case_objective_hard_and_smooth():
    hard = WorstCaseWeighting(TASKS, temperature=0.0)
    hard.objective(torch.tensor([0.5, 2.0]))  # the first call fixes L_i(0)
    assert hard.objective(torch.tensor([0.25, 1.5])).item() == pytest.approx(0.75)  # max(0.5, 0.75)
    assert hard.weights() == {"engagement": 0.0, "satisfaction": pytest.approx(0.5)}  # 1 / L(0)
    soft = WorstCaseWeighting(TASKS, temperature=0.1)
    soft.objective(torch.tensor([0.5, 2.0]))
    val = soft.objective(torch.tensor([0.25, 1.5])).item()
    assert 0.75 <= val <= 0.75 + 0.1 * math.log(2)
    w = soft.weights()
    assert w["satisfaction"] * 2.0 > w["engagement"] * 0.5  # the worse task dominates


def test_constant_predictor_losses_are_label_entropy_and_variance():
    tasks = [TaskConfig("click", "binary", "c"), TaskConfig("watch", "regression", label="w")]
    labels = np.array([[1, 2.0], [0, 4.0], [0, np.nan], [0, 6.0], [np.nan, 8.0]], dtype=np.float32)
    h, var = constant_predictor_losses(labels, tasks)
    assert h == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))  # q = 1/4, NaN ignored
    assert var == pytest.approx(np.var([2.0, 4.0, 6.0, 8.0]))
    # it is the loss of the best constant prediction: predicting q (binary) or the mean (regression)
    y = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.nn.functional.binary_cross_entropy(torch.full((4,), 0.25), y).item() == pytest.approx(h)
    with pytest.raises(ValueError, match="no observed"):
        constant_predictor_losses(np.full((3, 2), np.nan, dtype=np.float32), tasks)


def test_worst_case_constant_reference_does_not_starve_a_rare_label():
    """A 2% label: at zero logits its loss is log 2, its constant-predictor loss ~0.098. Halfway to
    learning something, both heads sit ~10% under their constant predictor; against L_i(0) the rare
    head looks 87% solved and gets almost no weight, against the constant predictor it gets its share."""
    rng = np.random.default_rng(0)
    labels = np.stack([rng.random(5000) < 0.4, rng.random(5000) < 0.02], axis=1).astype(np.float32)
    ref = constant_predictor_losses(labels, TASKS)
    first = torch.tensor([math.log(2), math.log(2)])  # the first batch, zero logits
    later = torch.tensor(ref) * 0.9
    initial = WorstCaseWeighting(TASKS, temperature=0.1)
    initial.objective(first)
    initial.objective(later)
    constant = WorstCaseWeighting(TASKS, temperature=0.1, reference=ref)
    constant.objective(first)
    constant.objective(later)
    # weight x R_i = the task's share of the softmax over normalised losses
    share_initial = initial.weights()["satisfaction"] * math.log(2)
    share_constant = constant.weights()["satisfaction"] * ref[1]
    assert share_initial < 1e-3 and share_constant == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError, match="one reference loss per task"):
        WorstCaseWeighting(TASKS, temperature=0.1, reference=[1.0])


@pytest.mark.parametrize(
    ("scheme", "cls"), [("worst_case", WorstCaseWeighting), ("gradnorm", GradNormWeighting)]
)
def test_loss_reference_from_the_config(ds, scheme, cls):
    """``[train.weighting.<scheme>] reference``: "constant" (the default) is the constant
    predictor's loss on the training labels, given up front; "initial" is taken from the first batch."""
    ref = constant_predictor_losses(ds.train.labels, TASKS)
    assert _weighting(scheme).reference == "constant"  # type: ignore[union-attr]
    w = make_weighting(TrainConfig(weighting=_weighting(scheme)), TASKS, ds.train.labels)
    assert isinstance(w, cls) and w.reference.value is not None
    assert w.reference.value.tolist() == pytest.approx(ref)
    lazy = make_weighting(TrainConfig(weighting=_weighting(scheme, reference="initial")), TASKS)
    assert isinstance(lazy, cls) and lazy.reference.value is None
    with pytest.raises(ValueError, match="training labels"):
        make_weighting(TrainConfig(weighting=_weighting(scheme)), TASKS)
    with pytest.raises(pydantic.ValidationError, match="reference"):
        _weighting(scheme, reference="first")
    with pytest.raises(ConfigError, match=rf"train\.weighting\.{scheme}\.reference: Input should be"):
        apply_overrides(tiny_config(), [f'train.weighting.{scheme}.reference="first"'])
    res = fit(_cfg(weighting=_weighting(scheme, reference="initial"), epochs=1), ds)
    assert res.metrics["weighting"] == scheme
    assert math.isfinite(res.metrics["test/satisfaction/auc"])


def _gradnorm_on_fixed_losses(reference, first, later, steps=40):
    """GradNorm (alpha 1.5) on a toy whose two task gradients have equal norms: the first step sees
    the losses ``first``, every later step ``later``; returns the final weights."""
    w = GradNormWeighting(TASKS, alpha=1.5, lr=0.05, reference=reference)
    theta = torch.nn.Parameter(torch.ones(3))

    class Toy(torch.nn.Module):
        def last_shared_parameters(self):
            return [theta]

    for step in range(steps):
        values = first if step == 0 else later
        # loss value v, gradient (1, 1, 1) for both tasks
        losses = {
            t.name: float(v) + (theta - theta.detach()).sum() for t, v in zip(TASKS, values, strict=True)
        }
        w.backward(losses, theta, Toy())
        w.after_step()
    return w.weights()


def test_gradnorm_constant_reference_does_not_starve_a_rare_label():
    """GradNorm's r_i = L_i / L_i(0) (the paper's "initial"): a 2% label's loss falls from log 2 to
    near its entropy at once, so it looks trained fast and its weight is driven down even when both
    heads are 10% below their constant predictor. Against the constant predictor both r_i are equal
    and, with equal gradient norms, the weights stay equal."""
    rng = np.random.default_rng(0)
    labels = np.stack([rng.random(5000) < 0.4, rng.random(5000) < 0.02], axis=1).astype(np.float32)
    ref = constant_predictor_losses(labels, TASKS)
    first, later = [math.log(2), math.log(2)], [0.9 * r for r in ref]
    initial = _gradnorm_on_fixed_losses(None, first, later)
    constant = _gradnorm_on_fixed_losses(ref, first, later)
    assert initial["satisfaction"] < 0.5 < 1.5 < initial["engagement"]
    assert constant["satisfaction"] == pytest.approx(1.0, abs=0.02)
    assert sum(constant.values()) == pytest.approx(2.0)


# -- a batch without labels for a task -------------------------------------------------------------

SCHEMES = ["static", "uncertainty", "mgda", "worst_case", "gradnorm", "pcgrad"]


def _tiny_sb_batch(b: int = 64, model: ModelConfig | None = None):
    schema = FeatureSchema(
        [
            FeatureSpec("u", "user", "categorical", vocab=[str(i) for i in range(5)]),
            FeatureSpec("x", "video", "numeric"),
        ]
    )
    model = model or ModelConfig(net=SharedBottomConfig(bottom_dims=[6]), embed_dim=3, tower_dims=[4])
    net = build_model(model, schema, TASKS)
    gen = torch.Generator().manual_seed(0)
    cats, nums = torch.randint(0, 6, (b, 1), generator=gen), torch.randn(b, 1, generator=gen)
    labels = torch.stack([torch.rand(b, generator=gen) < 0.3, torch.rand(b, generator=gen) < 0.8], 1).float()
    return net, cats, nums, labels


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_task_without_labels_in_the_batch_is_left_out(scheme):
    """satisfaction has no observed label in the batch: every scheme's step is then a positive
    multiple of engagement's own gradient (an unseen task's graph-keeping zero is not a real 0 loss:
    it must not take MGDA's whole weight, pull uncertainty's s_i down or drag GradNorm's means)."""
    net, cats, nums, labels = _tiny_sb_batch()
    labels[:, 1] = float("nan")
    seen = observed_tasks(labels)
    assert seen.tolist() == [True, False]
    w = make_weighting(TrainConfig(weighting=_weighting(scheme)), TASKS, np.array([[0.0, 1.0], [1.0, 0.0]]))
    params = [p for p in net.parameters()]
    out, z = net.forward_with_shared(cats, nums)
    losses = task_losses(out, labels, TASKS)
    grads = torch.autograd.grad(losses["engagement"], params, retain_graph=True, allow_unused=True)
    want = torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)]
    )
    w.backward(losses, z, net, seen)
    got = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
    k = float(got @ want / (want @ want))
    assert k > 0.1
    torch.testing.assert_close(got, k * want, rtol=1e-4, atol=1e-7)
    if scheme in ("mgda", "worst_case"):  # normalised schemes: all the weight on the seen task
        assert w.weights()["satisfaction"] == 0.0 and w.weights()["engagement"] > 0
    if scheme == "uncertainty":
        assert isinstance(w, UncertaintyWeighting) and w.log_vars.grad is not None
        assert w.log_vars.grad[1] == 0.0 and w.log_vars.grad[0] != 0.0


def test_initial_reference_waits_for_a_task_s_first_labels():
    """Under "initial", L_i(0) is a task's loss on the first batch that has labels for it, not a
    1e-8 stand-in from a batch that had none (which would blow its normalised loss up)."""
    w = WorstCaseWeighting(TASKS, temperature=0.0)
    w.objective(torch.tensor([0.5, 0.0]), torch.tensor([True, False]))
    assert w.objective(torch.tensor([0.25, 0.6]), torch.tensor([True, True])).item() == pytest.approx(1.0)
    assert w.reference.value is not None and w.reference.value.tolist() == pytest.approx([0.5, 0.6])


@pytest.mark.parametrize("arch", ["shared_bottom", "mmoe"])
def test_mgda_updates_shared_by_alpha_and_towers_by_their_own_loss(arch):
    """Sener & Koltun's Algorithm 2: the shared parameters get sum_i alpha_i dL_i, a task's own
    parameters dL_t unscaled (alpha only arbitrates what the tasks share)."""
    mmoe = ModelConfig(net=MMoEConfig(n_experts=3, expert_dims=[6]), embed_dim=3, tower_dims=[4])
    net, cats, nums, labels = _tiny_sb_batch(model=mmoe if arch == "mmoe" else None)
    out, z = net.forward_with_shared(cats, nums)
    losses = task_losses(out, labels, TASKS)
    shared = net.shared_parameters()
    per_task = [torch.autograd.grad(losses[t.name], shared, retain_graph=True) for t in TASKS]
    tower = net.towers["satisfaction"].out.weight
    (own,) = torch.autograd.grad(losses["satisfaction"], tower, retain_graph=True)
    w = make_weighting(TrainConfig(weighting=PlainWeighting("mgda")), TASKS)
    w.backward(losses, z, net)
    alpha = [w.weights()[t.name] for t in TASKS]
    assert 0 < alpha[1] < 1 and sum(alpha) == pytest.approx(1.0)
    for k, p in enumerate(shared):
        torch.testing.assert_close(p.grad, alpha[0] * per_task[0][k] + alpha[1] * per_task[1][k])
    torch.testing.assert_close(tower.grad, own)


def test_mgda_with_nothing_shared_weighs_tasks_equally():
    """Separate towers share no parameter: there is nothing to trade off, so MGDA gives 1/T each
    (their per-task gradients are orthogonal, which the min-norm rule would turn into arbitrary
    weights that merely rescale each task's own network)."""
    schema = FeatureSchema([FeatureSpec("u", "user", "categorical", vocab=[str(i) for i in range(5)])])
    net = build_model(
        ModelConfig(net=SeparateConfig(bottom_dims=[6]), embed_dim=3, tower_dims=[4]), schema, TASKS
    )
    gen = torch.Generator().manual_seed(0)
    cats, labels = (
        torch.randint(0, 6, (64, 1), generator=gen),
        (torch.rand(64, 2, generator=gen) < 0.4).float(),
    )
    out, z = net.forward_with_shared(cats, torch.zeros(64, 0))
    w = make_weighting(TrainConfig(weighting=PlainWeighting("mgda")), TASKS)
    w.backward(task_losses(out, labels, TASKS), z, net)
    assert w.weights() == {"engagement": 0.5, "satisfaction": 0.5}


# -- every scheme trains -------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", SCHEMES)
def test_every_weighting_reduces_the_task_losses(ds, weighting):
    res = fit(_cfg(weighting=weighting), ds)
    first, last = res.history[0], res.history[-1]
    before = first["train/engagement/loss"] + first["train/satisfaction/loss"]
    after = last["train/engagement/loss"] + last["train/satisfaction/loss"]
    assert after < before
    assert all(math.isfinite(v) for v in last.values())
    assert {f"weight/{t}" for t in ("engagement", "satisfaction")} <= set(last)
    assert res.metrics["weighting"] == weighting
    assert math.isfinite(res.metrics["test/engagement/auc"])


def test_mgda_weights_are_a_convex_combination(ds):
    res = fit(_cfg(weighting="mgda", epochs=1), ds)
    w = res.metrics["task_weights"]
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-5) and min(w.values()) >= 0


def test_unknown_weighting_is_a_config_error():
    cfg = tiny_config()
    with pytest.raises(ConfigError, match=r"train\.weighting: Input tag 'bogus' .* does not match"):
        apply_overrides(cfg, ["train.weighting=bogus"])
    d = cfg.to_dict()
    d["train"]["weighting"] = "bogus"
    with pytest.raises(ConfigError, match=r"train\.weighting: Input tag 'bogus'"):
        Config.from_dict(d)
    with pytest.raises(pydantic.ValidationError, match="weighting"):
        TrainConfig(weighting="bogus")  # type: ignore[arg-type]
    with pytest.raises(
        pydantic.ValidationError, match=r"kind\n.*'static', 'uncertainty', 'mgda' or 'pcgrad'"
    ):
        PlainWeighting(kind="gradnorm")  # type: ignore[arg-type]  # a scheme with keys is its own class


# -- the step log --------------------------------------------------------------------------------


def test_step_log_records_losses_and_weights_every_n_steps(ds, tmp_path):
    from model.checkpoint import load_checkpoint
    from model.train import save_result

    cfg = _cfg(weighting="gradnorm", epochs=2, log_every=3)
    res = fit(cfg, ds)
    steps_per_epoch = math.ceil(len(ds.train) / cfg.train.batch_size)
    assert [r["step"] for r in res.steps] == list(range(3, 2 * steps_per_epoch + 1, 3))
    assert {r["epoch"] for r in res.steps} == {1, 2}
    for r in res.steps:
        assert set(r) == {
            "step",
            "epoch",
            "loss",
            "engagement/loss",
            "satisfaction/loss",
            "weight/engagement",
            "weight/satisfaction",
        }
        assert sum(r[f"weight/{t}"] for t in ("engagement", "satisfaction")) == pytest.approx(2.0, rel=1e-4)
    # GradNorm moves the weights during training: the log sees them change step by step
    assert len({round(r["weight/engagement"], 6) for r in res.steps}) > 1
    # the epoch mean of the logged per-step weights agrees with the history's epoch mean
    ep1 = [r["weight/engagement"] for r in res.steps if r["epoch"] == 1]
    assert np.mean(ep1) == pytest.approx(res.history[0]["weight/engagement"], abs=0.05)
    # and the step log is kept in the checkpoint manifest
    ckpt = load_checkpoint(save_result(tmp_path, res, cfg, ds))
    assert ckpt.manifest["step_log"] == res.steps


def test_step_log_off_and_invalid(ds):
    assert fit(_cfg(epochs=1, log_every=0), ds).steps == []
    cfg = tiny_config()
    cfg.train.log_every = -1
    with pytest.raises(ConfigError, match="log_every"):
        cfg.validated()
