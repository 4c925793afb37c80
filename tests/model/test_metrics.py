import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from model.metrics import gauc, higher_is_better, ndcg_at_k

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.experiments import paired_mean_ratio, paired_ratio


def _data(seed: int = 0, users: int = 40):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, users, size=1500)
    y = (rng.random(1500) < 0.3).astype(float)
    p = np.round(rng.random(1500) * 0.5 + y * 0.2, 2)  # rounded: plenty of ties
    return y, p, groups


def test_gauc_matches_sklearn_user_by_user():
    y, p, g = _data()
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            num += roc_auc_score(y[m], p[m]) * m.sum()
            den += m.sum()
    assert gauc(y, p, g) == pytest.approx(num / den, rel=1e-9)


def test_gauc_skips_single_class_users():
    y = np.array([1, 0, 1, 1, 0, 0.0])
    p = np.array([0.9, 0.1, 0.5, 0.6, 0.3, 0.2])
    g = np.array([0, 0, 1, 1, 2, 2])
    assert gauc(y, p, g) == pytest.approx(1.0)
    assert np.isnan(gauc(np.ones(3), np.ones(3), np.zeros(3)))


def test_ndcg_matches_sklearn_user_by_user():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 30, size=600)
    gain = rng.integers(0, 3, size=600).astype(float)
    s = rng.random(600)  # no ties: sklearn averages over ties, we break them by input order
    vals = []
    for u in np.unique(g):
        m = g == u
        if gain[m].sum() > 0 and m.sum() > 1:
            vals.append(ndcg_score(gain[m][None], s[m][None], k=10))
        elif gain[m].sum() > 0:
            vals.append(1.0)
    assert ndcg_at_k(gain, s, g, k=10) == pytest.approx(np.mean(vals), rel=1e-9)


def test_metric_directions():
    assert higher_is_better("valid/engagement/auc") and higher_is_better("test/ndcg@10")
    assert not higher_is_better("valid/loss") and not higher_is_better("valid/watch/rmse")
    with pytest.raises(ValueError):
        higher_is_better("valid/unknown")


def test_paired_ratio_recovers_a_constant_factor_exactly():
    before = np.array([0.01, 0.2, 0.05, 0.7])
    r = paired_ratio(before, before * 1.5)
    assert r.ratio == pytest.approx(1.5) and r.low == pytest.approx(1.5) and r.high == pytest.approx(1.5)
    assert r.frac_higher == 1.0 and r.n == 4


def test_paired_ratio_sees_a_small_effect_under_large_spread():
    rng = np.random.default_rng(3)
    before = rng.lognormal(-3.5, 1.0, 40)  # runs differ by factors of ~10 ...
    after = before * np.exp(rng.normal(np.log(1.3), 0.15, 40))  # ... the effect is +30%
    r = paired_ratio(before, after)
    assert 1.0 < r.low < 1.3 < r.high < 1.5
    assert r.frac_higher > 0.9
    # unpaired, the same numbers show nothing: the means' difference is within their spread
    assert abs(after.mean() - before.mean()) < before.std() / np.sqrt(40) * 2


def test_paired_ratio_interval_covers_one_without_an_effect():
    rng = np.random.default_rng(4)
    before = rng.lognormal(-3.5, 1.0, 40)
    r = paired_ratio(before, before * np.exp(rng.normal(0.0, 0.2, 40)))
    assert r.low < 1.0 < r.high


@pytest.mark.parametrize(
    ("before", "after"),
    [([0.1, 0.2], [0.1]), ([0.1], [0.2]), ([0.1, 0.0], [0.1, 0.2]), ([0.1, np.nan], [0.1, 0.2])],
)
def test_paired_ratio_rejects_bad_input(before, after):
    with pytest.raises(ValueError):
        paired_ratio(np.array(before), np.array(after))


def test_paired_mean_ratio_recovers_a_constant_factor_exactly():
    before = np.array([0.01, 0.2, 0.05, 0.7])
    r = paired_mean_ratio(before, before * 1.5)
    assert (r.ratio, r.low, r.high) == pytest.approx((1.5, 1.5, 1.5))
    assert r.frac_higher == 1.0 and r.n == 4


def test_paired_mean_ratio_is_the_ratio_of_averaged_curves_and_feels_one_failed_run():
    rng = np.random.default_rng(5)
    before = rng.lognormal(-3.5, 0.3, 40)
    after = before * np.exp(rng.normal(0.0, 0.05, 40))
    after[0] = 20 * before.mean()  # one run of 40 fails: +50% on the mean of the others
    m, g = paired_mean_ratio(before, after), paired_ratio(before, after)
    assert m.ratio == pytest.approx(after.mean() / before.mean())
    assert m.ratio > 1.4 and m.low <= m.ratio <= m.high
    assert g.ratio < 1.15  # the geometric mean of per-seed ratios barely moves


def test_paired_mean_ratio_interval_covers_one_without_an_effect():
    rng = np.random.default_rng(6)
    before = rng.lognormal(-3.5, 1.0, 40)
    r = paired_mean_ratio(before, before * np.exp(rng.normal(0.0, 0.2, 40)))
    assert r.low < 1.0 < r.high


def test_paired_mean_ratio_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        paired_mean_ratio(np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="same length"):
        paired_mean_ratio(np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------------------------
# NDCG@10 of the combined score, as evaluate_predictions reports it


def _two_binary_heads_and_a_regression():
    from model.config import TaskConfig

    return [
        TaskConfig("engagement", "binary", "long_view"),
        TaskConfig("satisfaction", "binary", "is_like"),
        TaskConfig("watch", "regression", "play_time"),  # never part of the relevance gain
    ]


def _split():
    """User 0: four items with (engagement, satisfaction) labels; relevance = their sum:
    a (1, 1) -> 2, b (1, 0) -> 1, c (NaN, 1) -> 1 (an unobserved label counts 0), d (0, 0) -> 0.
    User 1: twelve items, one relevant, so ranks beyond 10 matter. User 2: no positive (skipped)."""
    nan = np.nan
    labels = [[1, 1, 50.0], [1, 0, 9.0], [nan, 1, 0.0], [0, 0, 99.0]]  # user 0: a, b, c, d
    labels += [[0, 0, 1.0]] * 11 + [[0, 1, 1.0]]  # user 1: the relevant one is the 12th item
    labels += [[0, 0, 1.0], [0, nan, 1.0]]  # user 2
    groups = np.array([0] * 4 + [1] * 12 + [2] * 2)
    return np.array(labels, dtype=np.float32), groups


def _ndcg(combined):
    from model.metrics import evaluate_predictions

    labels, groups = _split()
    n = len(groups)
    heads = {"engagement": np.full(n, 0.5), "satisfaction": np.full(n, 0.5), "watch": np.zeros(n)}
    out = evaluate_predictions(_two_binary_heads_and_a_regression(), labels, heads, groups, combined, "test/")
    return out["test/ndcg@10"]


def test_relevance_gain_is_the_sum_of_the_observed_binary_labels():
    from model.metrics import relevance_gain

    labels, _ = _split()
    gain = relevance_gain(labels, _two_binary_heads_and_a_regression())
    assert gain.tolist() == [2, 1, 1, 0] + [0] * 11 + [1] + [0, 0]


def test_ndcg_at_10_of_perfect_scores_is_one():
    # user 0 best first a, then b and c (equal gain), d; user 1's relevant item first
    combined = np.array([4, 3, 2, 1] + [0.5] * 11 + [0.9] + [0.3, 0.2])
    assert _ndcg(combined) == pytest.approx(1.0, abs=1e-12)


def test_ndcg_at_10_of_reversed_scores_by_hand():
    # user 0 ranked d, c, b, a: gains 0, 1, 1, 2; ideal 2, 1, 1, 0
    u0 = (0 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4) + 2 / np.log2(5)) / (
        2 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    )
    assert u0 == pytest.approx(0.6363, abs=1e-4)
    # user 1's relevant item ranked 12th: outside the top 10, NDCG@10 = 0; user 2 has no positive
    combined = np.array([1, 2, 3, 4, *range(12, 1, -1), 0.1, 0.3, 0.2], dtype=float)
    assert _ndcg(combined) == pytest.approx((u0 + 0.0) / 2, abs=1e-12)
    # ranked 10th it still counts: 1 / log2(11)
    combined[4 + 9], combined[15] = 0.1, 3.5  # the 10th item swaps scores with the relevant one
    assert _ndcg(combined) == pytest.approx((u0 + 1 / np.log2(11)) / 2, abs=1e-12)


def test_ndcg_gain_is_graded_not_binary():
    """b ranked above a (gains 1 then 2) is imperfect with the summed gain, perfect if only any
    positive counted: the order b, a, d, c gives (1 + 2/log2 3 + 0 + 1/log2 5) / (2 + 1/log2 3 + 1/2)."""
    combined = np.array([3, 4, 1, 2] + [0.5] * 11 + [0.9] + [0.3, 0.2], dtype=float)
    u0 = (1 + 2 / np.log2(3) + 1 / np.log2(5)) / (2 + 1 / np.log2(3) + 0.5)
    assert u0 == pytest.approx(0.8600, abs=1e-4)
    assert _ndcg(combined) == pytest.approx((u0 + 1.0) / 2, abs=1e-12)
