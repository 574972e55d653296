"""The statistics of `ctray bench learn`: the grouped held-out split and the paired bootstrap of a
difference of macro AUROCs, against a naive resampling loop."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctray.evaluate.paired import Scored, grouped_split, paired_macro_auroc


def test_grouped_split_keeps_each_group_on_one_side_and_follows_its_seed():
    groups = [f"p{i // 3}" for i in range(30)]  # 10 patients, 3 scans each
    test = grouped_split(groups, 0.3, seed=4)
    held = {g for g, t in zip(groups, test, strict=True) if t}
    kept = {g for g, t in zip(groups, test, strict=True) if not t}
    assert not held & kept and len(held) == 3 and test.sum() == 9
    assert np.array_equal(grouped_split(list(reversed(groups)), 0.3, seed=4), test[::-1])  # order-free
    assert any(not np.array_equal(grouped_split(groups, 0.3, seed=s), test) for s in range(5, 10))
    assert grouped_split(["a", "b"], 0.99, seed=0).sum() == 1  # never all, never none
    with pytest.raises(ValueError, match="at least 2 groups"):
        grouped_split(["a", "a"], 0.5, seed=0)


def _items(rng, scans, groups, shift, templates=2):
    """Three findings with labels per group-level truth, scores = shift x label + noise."""
    out = []
    for f in range(3):
        ids = np.array([s for s in scans if rng.random() < 0.9])  # items score different scans
        y = (rng.random(len(ids)) < 0.4).astype(int)
        y[:2] = [0, 1]
        out.append(Scored(f"f{f}", ids, y, shift * y + rng.normal(size=(templates, len(ids)))))
    return out


def _naive(a, b, group_of, resamples, seed, ci):
    """Each resample drawn as a loop would: groups with replacement, every scan of a drawn group
    copied in, sklearn's AUROC on the copy, mean over templates, mean over the defined items."""
    scans = sorted({s for it in a + b for s in it.scan_ids})
    names = sorted({group_of[s] for s in scans})
    rng = np.random.default_rng(seed)
    diffs, a_vals = [], []
    for _ in range(resamples):
        drawn = rng.integers(0, len(names), len(names))
        count = {g: int((drawn == i).sum()) for i, g in enumerate(names)}

        def macro(items, count=count):
            values = []
            for it in items:
                rep = np.array([count[group_of[s]] for s in it.scan_ids])
                y = np.repeat(it.labels, rep)
                if len(np.unique(y)) < 2:
                    continue
                values.append(np.mean([roc_auc_score(y, np.repeat(s, rep)) for s in it.scores]))
            return np.mean(values) if values else np.nan

        ma, mb = macro(a), macro(b)
        a_vals.append(ma)
        diffs.append(ma - mb)
    pct = [50 * (1 - ci), 50 * (1 + ci)]
    finite = lambda v: np.array(v)[np.isfinite(v)]  # noqa: E731
    return np.percentile(finite(a_vals), pct), np.percentile(finite(diffs), pct)


def test_paired_bootstrap_equals_a_naive_resampling_loop():
    rng = np.random.default_rng(0)
    scans = [f"s{i:02d}" for i in range(24)]
    group_of = {s: f"g{i // 2}" for i, s in enumerate(scans)}  # 12 patients
    a, b = _items(rng, scans, group_of, 1.5), _items(rng, scans, group_of, 0.2)
    got = paired_macro_auroc(a, b, group_of, resamples=200, seed=3, ci=0.9)
    a_ci, diff_ci = _naive(a, b, group_of, 200, 3, 0.9)
    np.testing.assert_allclose(got.a_ci, a_ci, atol=1e-12)
    np.testing.assert_allclose(got.difference_ci, diff_ci, atol=1e-12)
    point = np.mean([np.mean([roc_auc_score(it.labels, s) for s in it.scores]) for it in a])
    assert got.a == pytest.approx(point) and got.difference == pytest.approx(got.a - got.b)
    assert (got.items, got.scans, got.groups) == (3, 24, 12)


def test_a_model_against_itself_differs_by_exactly_zero_and_a_clear_effect_is_outside_its_ci():
    rng = np.random.default_rng(1)
    scans = [f"s{i:03d}" for i in range(120)]
    group_of = {s: f"g{i // 3}" for i, s in enumerate(scans)}
    a = _items(rng, scans, group_of, 3.0)
    same = paired_macro_auroc(a, a, group_of, resamples=100, seed=0)
    assert same.difference == 0 and same.difference_ci == (0.0, 0.0) and same.verdict == "inside its CI"
    chance = [Scored(it.item, it.scan_ids, it.labels, rng.normal(size=it.scores.shape)) for it in a]
    better = paired_macro_auroc(a, chance, group_of, resamples=300, seed=0)
    assert better.verdict == "A > B" and better.difference_ci[0] > 0.2
    assert paired_macro_auroc(chance, a, group_of, resamples=300, seed=0).verdict == "A < B"
