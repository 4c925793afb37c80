"""The ranking objective: per-list metrics, the fitted combination, calibration, and the gain and
list ids data preparation stores with every row."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from modelkit import DATA_DIR, FIXTURE_LOG, tiny_config
from sklearn.metrics import ndcg_score

from model import load_checkpoint, resolve_checkpoint
from model.checkpoint import seal_manifest
from model.combination import ScoredRows, check_calibration, choose_combination, fold_platt
from model.config import Config, ConfigError, apply_overrides
from model.data import load_dataset
from model.objective import (
    Lists,
    bootstrap_ci,
    calibration_check,
    combination_from_manifest,
    fit_combination,
    reliability,
)
from model.scoring import Ranker, combine_scores, head_outputs


def synthetic_lists(
    n_lists: int = 400, seed: int = 0, size: tuple[int, int] = (3, 12)
) -> tuple[np.ndarray, ...]:
    """List ids and three heads' scores in (0, 1) for lists of ``size`` rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*size, n_lists)
    ids = np.repeat(rng.permutation(n_lists) * 7919, sizes)  # ids in no particular order
    n = len(ids)
    return ids, rng.uniform(0.02, 0.98, n), rng.uniform(0.02, 0.98, n), rng.uniform(0.02, 0.98, n)


# -- per-list metrics ---------------------------------------------------------------------------


def test_list_metrics_match_a_list_by_list_reference() -> None:
    rng = np.random.default_rng(3)
    ids, _, _, _ = synthetic_lists(120, seed=3, size=(1, 25))
    gain = rng.choice([0.0, 0.0, 1.0, 5.0, 6.0], len(ids))
    score = rng.normal(size=len(ids))  # no ties
    ls = Lists(ids, gain, k=10, min_size=2)
    m = ls.metrics(score)
    want_ndcg, want_recall, want_top = [], [], []
    for i in ls.ids:  # the counted lists, in their order
        rows = ids == i
        g, s = gain[rows], score[rows]
        want_ndcg.append(ndcg_score([g], [s], k=10))
        top = np.argsort(-s)[:10]
        want_recall.append((g[top] > 0).sum() / (g > 0).sum())
        want_top.append(g[top].mean())
    np.testing.assert_allclose(m.ndcg, want_ndcg, rtol=1e-12)
    np.testing.assert_allclose(m.recall, want_recall, rtol=1e-12)
    np.testing.assert_allclose(m.top_gain, want_top, rtol=1e-12)
    assert ls.ndcg(score) == pytest.approx(np.mean(want_ndcg), rel=1e-12)


def test_only_lists_with_an_order_to_judge_count() -> None:
    ids = np.array([1, 2, 2, 3, 3, 3, 4, 4])
    gain = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 2.0])
    ls = Lists(ids, gain, k=10, min_size=2)
    # list 1 has one row, list 2 no positive gain: only lists 3 and 4 count
    assert ls.n_lists == 2 and ls.all_lists == 4
    assert sorted(ls.ids.tolist()) == [3, 4]
    assert ls.rows.tolist() == [3, 4, 5, 6, 7]
    assert ls.metrics(np.zeros(8)).ndcg[1] == pytest.approx(1.0)  # equal gains: every order is ideal


def test_ties_are_broken_by_a_fixed_random_order_not_by_the_log() -> None:
    """A constant score must not inherit the logged order: over many lists whose best row comes
    first in the log, a constant score ranks it first only about 1 time in 2."""
    n = 2000
    ids = np.repeat(np.arange(n), 2)
    gain = np.tile([1.0, 0.0], n)  # the logged first row is the good one
    m = Lists(ids, gain, k=10, min_size=2).metrics(np.zeros(2 * n))
    first = (m.ndcg == 1.0).mean()
    assert 0.45 < first < 0.55


# -- fitting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.25, 0.6, 2.0])
def test_fit_recovers_product_exponents(exponent: float) -> None:
    ids, s1, s2, _ = synthetic_lists()
    gain = s1 * s2**exponent  # the best order is exactly the product s1 * s2 ** exponent
    fit = fit_combination({"a": s1, "b": s2}, Lists(ids, gain, min_size=2), ("product",))
    w = fit.combination.weights
    assert fit.combination.method == "product"
    assert w["b"] / w["a"] == pytest.approx(exponent, rel=0.05)
    assert fit.ndcg > 0.9999 and fit.ndcg > fit.heads["a"] and fit.ndcg > fit.heads["b"]
    assert max(w.values()) == 1.0


def test_fit_recovers_sum_weights_and_picks_the_sum() -> None:
    ids, s1, s2, _ = synthetic_lists(seed=1)
    gain = 3.0 * s1 + 1.0 * s2
    fit = fit_combination({"a": s1, "b": s2}, Lists(ids, gain, min_size=2))  # product and sum
    w = fit.combination.weights
    assert fit.combination.method == "sum"
    assert w == {"a": 1.0, "b": pytest.approx(1 / 3, rel=0.05)}
    assert fit.by_method["sum"] > fit.by_method["product"]
    assert fit.default < fit.ndcg  # every weight 1 (a product) is not the best order


def test_fit_gives_an_irrelevant_head_no_weight() -> None:
    ids, s1, s2, s3 = synthetic_lists(seed=2)
    gain = s1**2 * s2
    fit = fit_combination({"a": s1, "b": s2, "noise": s3}, Lists(ids, gain, min_size=2), ("product",))
    w = fit.combination.weights
    assert w["noise"] == 0.0
    assert w["b"] / w["a"] == pytest.approx(0.5, rel=0.05)


def test_fitted_combination_is_what_combine_scores_serves() -> None:
    ids, s1, s2, _ = synthetic_lists(seed=4)
    lists = Lists(ids, s1 * s2**0.5, min_size=2)
    fit = fit_combination({"a": s1, "b": s2}, lists, ("product",))
    c = fit.combination
    served = combine_scores({"a": s1, "b": s2}, c.weights, c.method)
    assert lists.ndcg(served) == pytest.approx(fit.ndcg, abs=1e-12)


def scored(gain: np.ndarray, ids: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> ScoredRows:
    n = len(gain)
    heads = {"engagement": s1, "satisfaction": s2}
    return ScoredRows(heads, np.zeros((n, 2)), gain, ids, np.zeros(n, np.int32), None)


def test_the_searched_combination_is_served_when_it_beats_the_simple_ones() -> None:
    ids, s1, s2, _ = synthetic_lists(n_lists=600, seed=5)
    out = choose_combination(tiny_config(), scored(s1 * s2**0.5, ids, s1, s2))
    v, c = out["validation"], out["combination"]
    assert v["chosen"] == "search" and c["method"] == "product"
    assert c["weights"]["satisfaction"] / c["weights"]["engagement"] == pytest.approx(0.5, rel=0.05)
    (edge,) = (e for key, e in v["search"].items() if key.startswith("minus_"))  # the best simple one
    assert edge["low"] > 0 and v["ndcg@10"] == pytest.approx(v["search"]["ndcg@10"])


def test_a_simple_combination_is_served_when_the_search_gains_nothing() -> None:
    ids, s1, s2, _ = synthetic_lists(n_lists=600, seed=6)
    out = choose_combination(tiny_config(), scored(s1, ids, s1, s2))  # the gain follows one head
    assert out["validation"]["chosen"] == "engagement alone"
    assert out["combination"] == {"method": "product", "weights": {"engagement": 1.0, "satisfaction": 0.0}}
    assert out["validation"]["ndcg@10"] == pytest.approx(1.0)


def test_manifest_combination_is_checked_against_the_heads() -> None:
    ok = {"ranking": {"combination": {"method": "sum", "weights": {"a": 1, "b": 0.5}}}}
    assert combination_from_manifest(ok, ["a", "b"]).weights == {"a": 1.0, "b": 0.5}  # type: ignore[union-attr]
    assert combination_from_manifest({}, ["a"]) is None
    for bad in (
        {"method": "max", "weights": {"a": 1}},
        {"method": "sum", "weights": {"zz": 1}},
        {"method": "sum", "weights": {"a": -1}},
        {"method": "sum", "weights": {"a": 0}},
        {"method": "sum", "weights": {"a": True}},
        "product",
    ):
        with pytest.raises(ValueError):
            combination_from_manifest({"ranking": {"combination": bad}}, ["a", "b"])


def test_a_checkpoint_with_a_malformed_combination_is_rejected(
    trained_artifacts: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from model import CorruptCheckpointError

    src = resolve_checkpoint(trained_artifacts)
    dst = tmp_path / "models" / src.name
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["ranking"]["combination"]["weights"] = {"nosuchhead": 1.0}
    (dst / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))  # a fresh digest
    with pytest.raises(CorruptCheckpointError, match="nosuchhead"):
        Ranker.load(dst)


# -- calibration -----------------------------------------------------------------------------------


def test_reliability_of_calibrated_and_overconfident_probabilities() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.5, 200_000)
    y = (rng.random(len(p)) < p).astype(float)
    assert reliability(y, p)["ece"] < 0.005
    logit = np.log(p / (1 - p))
    over = 1 / (1 + np.exp(-2.0 * logit))  # over-confident: twice the logit
    assert reliability(y, over)["ece"] > 0.03
    order = np.arange(len(p))
    check = calibration_check(y, over, order < len(p) // 2, order >= len(p) // 2)
    held = check["held_out"]
    assert held["platt_params"]["a"] == pytest.approx(0.5, abs=0.02)
    assert held["platt_params"]["b"] == pytest.approx(0.0, abs=0.03)
    assert held["platt"]["logloss"] < held["served"]["logloss"]
    assert held["platt"]["ece"] < 0.005


def test_platt_folds_into_the_output_layer(trained_artifacts: Path) -> None:
    ckpt = load_checkpoint(resolve_checkpoint(trained_artifacts))
    model, tasks = ckpt.model, ckpt.config.tasks
    g = torch.Generator().manual_seed(0)
    cards = [f.cardinality for f in ckpt.schema.serving().cats()]
    cats = torch.stack([torch.randint(0, c, (64,), generator=g) for c in cards], dim=1)
    nums = torch.randn(64, ckpt.schema.n_nums, generator=g)
    with torch.no_grad():
        before = head_outputs(model(cats, nums), tasks)["satisfaction"]
        assert fold_platt(model, "satisfaction", 0.7, -0.4)
        after = head_outputs(model(cats, nums), tasks)["satisfaction"]
    z = np.log(before / (1 - before))
    np.testing.assert_allclose(after, 1 / (1 + np.exp(-(0.7 * z - 0.4))), rtol=1e-5)


@pytest.mark.slow
def test_calibration_is_applied_only_where_it_helps_held_out_rows() -> None:
    cfg = tiny_config()
    rng = np.random.default_rng(1)
    n = 40_000
    p = rng.uniform(0.05, 0.6, n)
    y_ok = (rng.random(n) < p).astype(float)
    logit = np.log(p / (1 - p))
    over = 1 / (1 + np.exp(-2.0 * logit))
    rows = ScoredRows(
        {"engagement": p, "satisfaction": over},
        np.stack([y_ok, y_ok], axis=1),
        y_ok,
        np.arange(n) // 4,
        np.zeros(n, np.int32),
        np.arange(n, dtype=float),  # times: the later half is judged
    )
    report, apply = check_calibration(cfg, rows)
    assert set(apply) == {"satisfaction"}  # the calibrated head is left alone
    a, b = apply["satisfaction"]
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(0.0, abs=0.1)
    assert report["satisfaction"]["held_out"]["platt_logloss_change"]["high"] < 0
    assert report["engagement"]["held_out"]["platt_logloss_change"]["high"] >= 0
    assert "later half" in report["held_out_check"]


def test_bootstrap_interval_covers_the_mean() -> None:
    v = np.random.default_rng(0).normal(0.3, 1.0, 5000)
    low, high = bootstrap_ci(v, resamples=500)
    assert low < v.mean() < high and high - low == pytest.approx(2 * 1.96 / math.sqrt(5000), rel=0.2)


# -- config and data -----------------------------------------------------------------------------


def test_objective_config_is_checked() -> None:
    cfg = tiny_config()
    assert cfg.objective.gain == {"long_view": 1.0, "is_like": 5.0}
    assert cfg.objective.lists(cfg.data) == ["user_id", "date", "tab"]
    for bad in (
        "objective.gain={long_view = -1}",
        "objective.k=0",
        'objective.fit="max"',
        "objective.gain={a = 0}",
    ):
        with pytest.raises(ConfigError):
            apply_overrides(cfg, [bad])
    with pytest.raises(ConfigError, match="unknown keys"):
        Config.from_dict({**cfg.to_dict(), "objective": {"gains": {}}})
    d = cfg.to_dict()
    d["tasks"][1]["kind"] = "regression"
    d["objective"]["fit"] = "product"
    with pytest.raises(ConfigError, match="product"):
        Config.from_dict(d)
    default = tiny_config()
    default.objective.group_by = None
    assert default.objective.lists(default.data) == ["user_id"]  # data.group_by's default: the user


def test_rows_carry_the_objectives_gain_and_list_ids(tmp_path: Path) -> None:
    cfg = tiny_config()
    ds = load_dataset(cfg, cache_dir=tmp_path)
    log = pd.read_csv(DATA_DIR / FIXTURE_LOG).drop_duplicates().reset_index(drop=True)
    lo, hi = cfg.data.test_range
    test = log[(log["date"] >= lo) & (log["date"] <= hi)].reset_index(drop=True)
    np.testing.assert_array_equal(test["time_ms"].to_numpy(), ds.test.times)  # the same rows
    assert ds.test.gain is not None and ds.test.lists is not None
    np.testing.assert_allclose(ds.test.gain, test["long_view"] + 5.0 * test["is_like"])
    # one list id per user x date x tab, and different ids for different lists
    want = test.groupby(["user_id", "date", "tab"]).ngroup().to_numpy()
    got = pd.factorize(ds.test.lists)[0]
    assert len(np.unique(got)) == len(np.unique(want))
    assert pd.crosstab(got, want).astype(bool).sum(axis=1).max() == 1
