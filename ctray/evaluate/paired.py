"""Two models' scores on the same held-out scans, compared: a grouped held-out split and a paired
bootstrap over groups of the difference of their macro AUROC (`ctray bench learn`).

Paired: every resample draws one set of groups and scores both models on it, so the interval of
the difference carries the correlation between the two models' errors on the same scans (the
interval of a difference of two independent bootstraps would be wider and could hide an effect).
Groups are patients or studies, resampled with all their scans (ctray.evaluate.bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctray.evaluate.bootstrap import Interval, group_resample_weights, nanmean, percentile_interval
from ctray.evaluate.zeroshot import weighted_metrics


def grouped_split(groups: list[str], held_out: float, seed: int) -> np.ndarray:
    """(n,) bool: the scans held out, all scans of a group on one side. A seeded permutation of the
    distinct groups (sorted first, so the order of `groups` does not matter); the first
    round(held_out x groups) of it are held out, at least one and never all."""
    names = sorted(set(groups))
    if len(names) < 2:
        raise ValueError(f"a grouped split needs at least 2 groups, not {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    k = min(max(1, round(held_out * len(names))), len(names) - 1)
    test = {names[i] for i in order[:k]}
    return np.array([g in test for g in groups])


@dataclass(frozen=True)
class Scored:
    """One binary item (a finding) as one model scores the held-out scans."""

    item: str
    scan_ids: np.ndarray
    """(n,) the scans scored."""
    labels: np.ndarray
    """(n,) 0/1."""
    scores: np.ndarray
    """(T, n) scores; higher means positive. T > 1: zero-shot templates, averaged after the AUROC."""


@dataclass(frozen=True)
class Comparison:
    """Macro AUROC (mean over items) of model A and model B, and of A - B, with intervals."""

    a: float
    a_ci: Interval
    b: float
    b_ci: Interval
    difference: float
    difference_ci: Interval
    items: int
    """Items scored by both models with both classes present."""
    scans: int
    groups: int

    @property
    def verdict(self) -> str:
        """ "A > B" when the interval of the difference lies above 0, "A < B" below, else "inside its CI"."""
        lo, hi = self.difference_ci
        if lo > 0:
            return "A > B"
        if hi < 0:
            return "A < B"
        return "inside its CI"


def _macro_auroc(items: list[Scored], index: dict[str, int], weights: np.ndarray) -> np.ndarray:
    """(B,) macro AUROC of weighted copies of the scans (weights (B, S) over `index`'s scans)."""
    per_item = []
    for it in items:
        w = weights[:, [index[s] for s in it.scan_ids]]
        per_template = [weighted_metrics(s, it.labels, w)["auroc"] for s in it.scores]
        per_item.append(np.mean(per_template, axis=0))
    return nanmean(np.stack(per_item), 0)


def paired_macro_auroc(
    a: list[Scored], b: list[Scored], group_of: dict[str, str], resamples: int, seed: int, ci: float = 0.95
) -> Comparison:
    """Compare the items both A and B score (matched by name; scans may differ by item) on the
    scans of `group_of` (scan id -> group): point estimates on the scans as they are, intervals
    from `resamples` draws of the groups shared by A, B and the difference."""
    b_of = {it.item: it for it in b}
    pairs = [(it, b_of[it.item]) for it in a if it.item in b_of and 0 < it.labels.sum() < len(it.labels)]
    if not pairs:
        raise ValueError("no item scored by both models with both classes present")
    scan_ids = sorted({s for x, y in pairs for s in (*x.scan_ids, *y.scan_ids)})
    index = {s: i for i, s in enumerate(scan_ids)}
    group_names, group_index = np.unique([group_of[s] for s in scan_ids], return_inverse=True)
    ones = np.ones((1, len(scan_ids)), dtype=np.int64)
    weights = group_resample_weights(group_index, resamples, seed)
    a_items, b_items = [x for x, _ in pairs], [y for _, y in pairs]
    a_point, b_point = float(_macro_auroc(a_items, index, ones)[0]), float(_macro_auroc(b_items, index, ones)[0])
    a_draws, b_draws = _macro_auroc(a_items, index, weights), _macro_auroc(b_items, index, weights)
    return Comparison(
        a_point,
        percentile_interval(a_draws, ci),
        b_point,
        percentile_interval(b_draws, ci),
        a_point - b_point,
        percentile_interval(a_draws - b_draws, ci),
        len(pairs),
        len(scan_ids),
        len(group_names),
    )
