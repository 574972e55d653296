"""Percentile bootstrap over groups (Efron & Tibshirani; the cluster bootstrap): resample the
evaluation set's groups (patients or studies) with replacement, each with all its scans,
recompute the statistic, take the central `ci` quantiles. Resampling scans instead would treat
several reconstructions of one patient as independent draws and narrow the interval. A resample is
a vector of per-scan multiplicities, so the zero-shot metrics of all resamples come from one
vectorised call (ctray.evaluate.zeroshot.weighted_metrics) instead of a loop over copies.

Groups are resampled jointly for every item, so a macro average's interval carries the correlation
between findings of the same scans."""

from __future__ import annotations

import numpy as np

from ctray.evaluate.zeroshot import METRICS, TASKS, ItemScores, weighted_metrics

Interval = tuple[float, float]


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: how often each of n units is drawn in each resample. The draws are
    rng.integers(0, n, n) per resample from default_rng(seed), in order (as a loop would draw)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    offsets = (np.arange(resamples) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def group_resample_weights(group_index: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, S) per-scan counts of a bootstrap over groups: each scan counts as often as its
    group (group_index (S,) in 0..G-1) is drawn. With one scan per group, resample_weights."""
    groups = int(group_index.max()) + 1 if len(group_index) else 0
    return resample_weights(groups, resamples, seed)[:, group_index]


def percentile_interval(values: np.ndarray, ci: float) -> Interval:
    """Central `ci` interval of the finite values (resamples where the statistic is undefined, e.g.
    one class only, are left out); (NaN, NaN) when there are none."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi)


def nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean of the finite entries along `axis`; NaN where there are none (without numpy's warning)."""
    ok = np.isfinite(a)
    count = ok.sum(axis)
    total = np.where(ok, a, 0.0).sum(axis)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def zero_shot_intervals(
    items: list[ItemScores], weights: np.ndarray, ci: float
) -> dict[str, dict[str, dict[str, Interval]]]:
    """task -> item (or "macro") -> metric -> interval of its mean over templates, for the scorable
    items; weights (B, S) from resample_weights over all evaluation scans. A resample's macro value
    averages the items defined in it (both classes drawn)."""
    out: dict[str, dict[str, dict[str, Interval]]] = {}
    for task in TASKS:
        mine = [it for it in items if it.task == task and it.scorable]
        if not mine:
            continue
        # per item: metric -> (T, B)
        draws = [
            {m: np.stack([r[m] for r in rows]) for m in METRICS}
            for rows in (
                [
                    weighted_metrics(mt, it.labels, weights[:, it.scans], it.threshold(t))
                    for t, mt in enumerate(it.margins)
                ]
                for it in mine
            )
        ]
        out[task] = {
            it.item: {m: percentile_interval(d[m].mean(0), ci) for m in METRICS}
            for it, d in zip(mine, draws, strict=True)
        }
        out[task]["macro"] = {
            m: percentile_interval(nanmean(np.stack([d[m] for d in draws]), 0).mean(0), ci) for m in METRICS
        }
    return out


def mean_intervals(
    items: dict[str, tuple[np.ndarray, np.ndarray]], weights: np.ndarray, ci: float
) -> tuple[dict[str, Interval], Interval]:
    """Intervals of per-query means (retrieval, probes' out-of-fold hits): items name -> (the scan
    of each query (n,), its value (n,)); weights (B, S) from group_resample_weights over the
    evaluation scans. -> per item the interval of its mean, and of the macro mean over the items
    defined in a resample. A scan drawn twice counts its queries twice; a gallery that is not the
    evaluation set is not resampled (it is the fixed reference the queries search)."""
    means = {}
    for name, (scans, values) in items.items():
        w = weights[:, scans].astype(np.float64)
        total = w.sum(1)
        means[name] = np.divide(w @ values, total, out=np.full(len(w), np.nan), where=total > 0)
    per = {name: percentile_interval(m, ci) for name, m in means.items()}
    macro = percentile_interval(nanmean(np.stack(list(means.values())), 0), ci) if means else (np.nan, np.nan)
    return per, (float(macro[0]), float(macro[1]))
