import numpy as np
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from model.metrics import gauc, higher_is_better, ndcg_at_k, paired_mean_ratio, paired_ratio


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
