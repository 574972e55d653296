"""`ctray eval` (ctray.evaluate) and the shared zero-shot metric code: bootstrap, probes and
retrieval against naive scikit-learn / numpy loops, the report folder end to end on a synthetic
embeddings folder (the `ctray embed` contract), and the one-line errors of bad input.

The text tower of these tests is a hashing bag-of-words embedder (HashTower): each lower-cased
word maps to a fixed random vector seeded by its hash, a text to the normalised sum of its words'
vectors. It is deterministic and needs no tokenizer or weights, and distinct prompts get distinct
embeddings, which is all the zero-shot code relies on; the expected zero-shot numbers are
recomputed from the same tower with scikit-learn, never hard-coded."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.evaluate.bootstrap import (
    group_resample_weights,
    mean_intervals,
    percentile_interval,
    resample_weights,
    zero_shot_intervals,
)
from ctray.evaluate.config import EvalReportConfig, ProbeConfig, RetrievalConfig, ZeroShotConfig
from ctray.evaluate.embeddings import load_embeddings
from ctray.evaluate.probe import ProbeTask, cross_validate, labelled_subset, probe_tasks, run_probes
from ctray.evaluate.retrieval import gallery_retrieval, label_overlap_at_k, precision_at_k, text_to_scan_ranks
from ctray.evaluate.run import run_eval
from ctray.evaluate.zeroshot import AnatomyScans, ItemScores, Prompts, evaluate, weighted_metrics

DIM = 16


class HashTower:
    """Hashing bag-of-words text tower (see the module docstring)."""

    def __init__(self, dim: int = DIM, temperature: float = 0.05):
        self.dim, self._tau = dim, temperature

    def _word(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = np.stack([sum(self._word(w) for w in re.findall(r"\w+", t.lower())) for t in texts])
        return torch.from_numpy(out / np.linalg.norm(out, axis=1, keepdims=True)).float()

    @property
    def temperature(self) -> float:
        return self._tau


def sklearn_metrics(margin: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred = (margin > 0).astype(int)
    return {
        "auroc": roc_auc_score(labels, margin),
        "balanced_accuracy": balanced_accuracy_score(labels, pred),
        "weighted_f1": f1_score(labels, pred, average="weighted"),
        "sensitivity": recall_score(labels, pred),
        "specificity": recall_score(labels, pred, pos_label=0),
        "precision": precision_score(labels, pred, zero_division=0),
    }


# Bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_metrics_equal_scikit_learn_on_each_resample():
    """weighted_metrics with bootstrap counts == scikit-learn on the resampled arrays, drawn by a
    naive loop from the same seed (ties and margins of 0 included; NaN where a class is missing)."""
    rng = np.random.default_rng(1)
    n, resamples = 25, 60
    margin = rng.normal(size=n).round(1)
    labels = (rng.random(n) < 0.3).astype(int)
    labels[:2] = [0, 1]
    got = weighted_metrics(margin, labels, resample_weights(n, resamples, seed=7))
    loop = np.random.default_rng(7)
    for b in range(resamples):
        idx = loop.integers(0, n, n)
        if labels[idx].min() == labels[idx].max():
            assert all(math.isnan(got[m][b]) for m in got)
            continue
        for m, want in sklearn_metrics(margin[idx], labels[idx]).items():
            assert got[m][b] == pytest.approx(want, abs=1e-12), (b, m)


def test_bootstrap_interval_of_a_mean_known_case():
    """The CI of a sample mean: equal to a naive resampling loop, contains the estimate, width
    about 2 x 1.96 sigma / sqrt(n), and half as wide with 4x the scans."""
    widths = []
    for n in (400, 1600):
        x = np.random.default_rng(n).normal(size=n)
        lo, hi = percentile_interval(resample_weights(n, 1000, seed=3) @ x / n, 0.95)
        loop = np.random.default_rng(3)
        naive = [x[loop.integers(0, n, n)].mean() for _ in range(1000)]
        assert (lo, hi) == pytest.approx(tuple(np.percentile(naive, [2.5, 97.5])), abs=1e-12)
        assert lo < x.mean() < hi
        assert hi - lo == pytest.approx(2 * 1.96 * x.std() / math.sqrt(n), rel=0.15)
        widths.append(hi - lo)
    assert widths[1] / widths[0] == pytest.approx(0.5, abs=0.1)


def test_zero_shot_intervals_resample_scans_jointly_like_a_naive_loop():
    """Item and macro CIs of the template-mean AUROC: two items over overlapping scans, resampled
    jointly, against a loop that resamples scan ids and recomputes with scikit-learn."""
    rng = np.random.default_rng(2)
    s, resamples = 30, 80
    items = []
    for task_item, scans in (("a", np.arange(0, 24)), ("b", np.arange(8, 30))):
        labels = (rng.random(len(scans)) < 0.4).astype(int)
        labels[:2] = [0, 1]
        margins = rng.normal(size=(3, len(scans))).round(1) + labels
        items.append(ItemScores("finding", task_item, "liver", scans, labels, margins))
    got = zero_shot_intervals(items, resample_weights(s, resamples, seed=5), 0.9)["finding"]
    loop = np.random.default_rng(5)
    per_item: dict[str, list[float]] = {"a": [], "b": []}
    macro = []
    for _ in range(resamples):
        drawn = loop.integers(0, s, s)
        values = []
        for it in items:
            pos = np.concatenate([np.flatnonzero(it.scans == d) for d in drawn])  # the item's scans drawn
            y = it.labels[pos]
            v = np.mean([roc_auc_score(y, m[pos]) for m in it.margins]) if 0 < y.sum() < len(y) else np.nan
            per_item[it.item].append(v)
            values.append(v)
        macro.append(np.nanmean(values) if np.isfinite(values).any() else np.nan)
    for name, values in per_item.items():
        want = np.nanpercentile(values, [5, 95])
        assert got[name]["auroc"] == pytest.approx(tuple(want), abs=1e-12)
    assert got["macro"]["auroc"] == pytest.approx(tuple(np.nanpercentile(macro, [5, 95])), abs=1e-12)


# Probes and retrieval ----------------------------------------------------------------------------


def separable(n: int, seed: int, positives: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=int)
    y[rng.choice(n, positives, replace=False)] = 1
    x = rng.normal(size=(n, 8)) + 0.8 * y[:, None] * np.linspace(1, -1, 8)
    return x, y


def test_probe_and_knn_cross_validation_equal_cross_val_score():
    """With C fixed, the probes' fold scores are cross_val_score's over the same group splitter, and
    their out-of-fold scores cross_val_predict's."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = separable(60, 0, 20)
    groups = np.arange(60) // 2  # pairs of scans share a group
    y[1::2] = y[::2]  # and a label, as reconstructions of one scan do
    cfg = ProbeConfig(knn_k=5, cs=[1.0])
    reference = {
        "linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced")),
        "knn": KNeighborsClassifier(5, metric="cosine", weights="distance"),
    }
    for kind, model in reference.items():
        got = cross_validate(ProbeTask("finding", "f", x, y, groups), kind, cfg, folds=4, fraction=1.0, seed=3)
        cv = StratifiedGroupKFold(4, shuffle=True, random_state=3)
        for score, scoring in (("auroc", "roc_auc"), ("balanced_accuracy", "balanced_accuracy")):
            want = cross_val_score(model, x, y, groups=groups, cv=cv, scoring=scoring)
            assert got.per_fold[score] == pytest.approx(list(want), abs=1e-12), (kind, score)
        method = "decision_function" if kind == "linear" else "predict_proba"
        predicted = cross_val_predict(model, x, y, groups=groups, cv=cv, method=method)
        want_oof = predicted if kind == "linear" else predicted[:, 1]
        assert got.out_of_fold == pytest.approx(want_oof, abs=1e-12), kind


def test_linear_probe_chooses_c_inside_the_training_fold():
    """LogisticRegressionCV over group folds of the training fold: the C it picks is the one whose
    inner-fold AUROC is highest (a naive loop over cs and the same inner splits)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

    from ctray.evaluate.probe import estimator

    x, y = separable(48, 5, 18)
    groups = np.arange(48) // 3
    y = y[groups * 3]  # one label per group
    cfg = ProbeConfig(cs=[1e-3, 1e-1, 10.0], inner_folds=3)
    model = estimator("linear", cfg, y, groups, seed=2).fit(x, y)
    xs = StandardScaler().fit_transform(x)
    splits = list(StratifiedGroupKFold(3, shuffle=True, random_state=2).split(y, y, groups))
    mean_auroc = [
        np.mean(
            [
                roc_auc_score(
                    y[te],
                    LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
                    .fit(xs[tr], y[tr])
                    .decision_function(xs[te]),
                )
                for tr, te in splits
            ]
        )
        for c in cfg.cs
    ]
    assert float(np.ravel(model[-1].C_)[0]) == pytest.approx(cfg.cs[int(np.argmax(mean_auroc))])


def test_groups_stop_reconstructions_of_one_scan_from_scoring_each_other():
    """The leak issue 25 measured: labels independent of the features, two near-identical
    reconstructions per scan. Split per scan, a reconstruction finds its twin (AUROC and P@1 far above
    chance); split by group, the probes and retrieval fall to chance."""
    rng = np.random.default_rng(11)
    scans = 150
    base = rng.normal(size=(scans, 256))  # more features than training scans, as real embeddings have
    x = np.repeat(base, 2, axis=0) + 0.01 * rng.normal(size=(2 * scans, 256))  # two reconstructions each
    y = np.repeat(rng.integers(0, 2, scans), 2)  # labels of nothing the features hold
    patient = np.arange(2 * scans) // 2
    per_scan = np.arange(2 * scans)
    cfg = ProbeConfig(knn_k=10, cs=[1.0])

    def auroc(kind: str, groups: np.ndarray) -> float:
        scores = cross_validate(ProbeTask("finding", "f", x, y, groups), kind, cfg, 5, 1.0, 0)
        return float(np.mean(scores.per_fold["auroc"]))

    assert auroc("knn", per_scan) > 0.9 and auroc("linear", per_scan) > 0.6  # the leak
    assert abs(auroc("knn", patient) - 0.5) < 0.1 and abs(auroc("linear", patient) - 0.5) < 0.1
    leaky, chance = (v.mean() for v in precision_at_k(x, y, 1, y == 1, per_scan))
    assert leaky == 1.0 and abs(chance - 0.5) < 0.05
    fair, chance = (v.mean() for v in precision_at_k(x, y, 10, y == 1, patient))  # ~750 draws: a binomial sd of ~0.02
    assert abs(fair - chance) < 0.08


def test_probe_folds_capped_subsets_stratified_and_tiny_labels_skipped():
    rng = np.random.default_rng(0)
    train = np.arange(40)
    y = (np.arange(40) < 10).astype(int)
    sub = labelled_subset(train, y, 0.1, rng)
    assert sorted(np.bincount(y[sub], minlength=2)) == [1, 3]  # 10% of each class, at least one
    x3, y3 = separable(20, 1, 3)
    x1, y1 = separable(20, 2, 1)
    rows, notes = run_probes(
        [ProbeTask("finding", "three", x3, y3, np.arange(20)), ProbeTask("finding", "one", x1, y1, np.arange(20))],
        ProbeConfig(folds=5, labelled_fractions=[0.5, 1.0], knn_k=3),
        seed=0,
    )
    assert {r.folds for r in rows} == {3} and {r.name for r in rows} == {"three"}
    assert len(rows) == 4  # 2 kinds x 2 fractions
    assert all(np.isnan(r.auroc_ci).all() for r in rows)  # no resamples asked for
    assert notes == ["probe finding one: 1 positive of 20 labelled scans (needs >= 2 groups of each class)"]


def test_probe_auroc_interval_resamples_groups_of_the_out_of_fold_scores_like_a_loop():
    from ctray.evaluate.probe import pooled_auroc_interval

    x, y = separable(40, 5, 15)
    groups = np.arange(40) // 2
    task = ProbeTask("finding", "f", x, y, groups)
    scores = cross_validate(task, "linear", ProbeConfig(cs=[1.0]), 4, 1.0, seed=0).out_of_fold
    got = pooled_auroc_interval(task, scores, 200, seed=1, ci=0.9)
    draws = []
    for w in group_resample_weights(groups, 200, seed=1):  # groups are 0..19 already
        idx = np.repeat(np.arange(40), w)
        draws.append(roc_auc_score(y[idx], scores[idx]) if len(np.unique(y[idx])) == 2 else np.nan)
    assert got == pytest.approx(percentile_interval(np.array(draws), 0.9))
    assert got[0] < roc_auc_score(y, scores) < got[1]


def test_retrieval_precision_and_recall_equal_naive_loops():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 6))
    classes = rng.integers(0, 3, 30)
    groups = np.arange(30) // 3
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    queries = classes == 1
    for k in (1, 5, 40):
        want, chance = [], []
        for i in np.flatnonzero(queries):
            gallery = [j for j in range(30) if groups[j] != groups[i]]  # not its own group
            ranked = [j for j in np.argsort(-(unit @ unit[i]), kind="stable") if j in gallery][: min(k, 27)]
            want.append(np.mean(classes[ranked] == classes[i]))
            chance.append(np.mean(classes[gallery] == classes[i]))
        got, got_chance = precision_at_k(x, classes, k, queries, groups, chunk=4)
        assert list(got) == pytest.approx(want, abs=1e-12) and list(got_chance) == pytest.approx(chance, abs=1e-12)
    s, a = 12, 2
    text, image = rng.normal(size=(s, a, 6)), rng.normal(size=(s, a, 6))
    present, region = rng.random((s, a)) < 0.7, rng.random((s, a)) < 0.9
    present &= region
    groups = np.arange(s) // 2
    ranks = text_to_scan_ranks(text, image, present, region, ["liver", "lung"], groups)
    for j, name in enumerate(["liver", "lung"]):
        want = []
        for i in np.flatnonzero(present[:, j]):
            gallery = [g for g in np.flatnonzero(region[:, j]) if g == i or groups[g] != groups[i]]
            sims = [float(image[g, j] @ text[i, j] / np.linalg.norm(image[g, j])) for g in gallery]
            order = [gallery[o] for o in np.argsort(-np.array(sims), kind="stable")]
            want.append(order.index(i))
        assert list(ranks[name]) == want


def _naive_ranking(q: np.ndarray, gallery: np.ndarray, allowed: list[int]) -> list[int]:
    """The allowed gallery rows, most cosine-similar to q first (ties in gallery order)."""
    sims = [float(gallery[j] @ q / np.linalg.norm(gallery[j]) / np.linalg.norm(q)) for j in allowed]
    return [allowed[o] for o in np.argsort(-np.array(sims), kind="stable")]


def test_ctfm_gallery_retrieval_equals_naive_loops():
    """P@k, AP@k (mean precision at the ranks holding a match) and hit rate@k of queries against a
    separate gallery, the query's group left out of it, against a loop over the queries."""
    rng = np.random.default_rng(21)
    q_x, g_x = rng.normal(size=(9, 5)), rng.normal(size=(20, 5))
    q_c, g_c = rng.integers(0, 2, 9), rng.integers(0, 2, 20)
    q_g, g_g = np.arange(9), np.r_[np.arange(9), np.full(11, 50)]  # each query's patient is in the gallery once
    for k in (1, 3, 19):
        got = gallery_retrieval(q_x, q_c, q_g, g_x, g_c, g_g, k, chunk=4)
        for i in range(9):
            allowed = [j for j in range(20) if g_g[j] != q_g[i]]
            hits = [g_c[j] == q_c[i] for j in _naive_ranking(q_x[i], g_x, allowed)[:k]]
            at = [np.mean(hits[: r + 1]) for r in range(k) if hits[r]]
            assert got["p"][i] == pytest.approx(np.mean(hits))
            assert got["ap"][i] == pytest.approx(np.mean(at) if at else 0.0)
            assert got["hr"][i] == float(any(hits))
            assert got["chance"][i] == pytest.approx(np.mean([g_c[j] == q_c[i] for j in allowed]))


def test_ctclip_label_overlap_equals_a_naive_loop():
    """CT-CLIP's volume-to-volume retrieval: every scan with a known label queries the scans with a
    positive finding (its own group left out); a retrieved scan scores |both positive| / |positive in
    either| over the findings known in both."""
    rng = np.random.default_rng(22)
    n = 24
    x = rng.normal(size=(n, 6))
    labels = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, 4), p=[0.1, 0.6, 0.3])
    labels[3] = -1  # no known label: not a query
    labels[5] = 0  # no positive: a query, not in the gallery
    groups = np.arange(n) // 2

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        known = (a >= 0) & (b >= 0)
        both, either = np.sum(known & (a == 1) & (b == 1)), np.sum(known & ((a == 1) | (b == 1)))
        return both / either if either else 0.0

    for k in (1, 5):
        rows, got, chance = label_overlap_at_k(x, labels, groups, k, chunk=5)
        assert 3 not in rows and 5 in rows
        for row, value, level in zip(rows, got, chance, strict=True):
            allowed = [j for j in range(n) if (labels[j] == 1).any() and groups[j] != groups[row]]
            top = _naive_ranking(x[row], x, allowed)[:k]
            assert value == pytest.approx(np.mean([overlap(labels[row], labels[j]) for j in top]))
            assert level == pytest.approx(np.mean([overlap(labels[row], labels[j]) for j in allowed]))


def test_retrieval_intervals_resample_query_groups_like_a_loop():
    """mean_intervals: per item the percentile interval of its queries' mean over resamples of the
    groups (a scan drawn twice counts its queries twice); the macro averages the items per resample."""
    group_index = np.array([0, 0, 1, 2, 2, 3, 4, 4])
    items = {"a": (np.array([0, 1, 2, 4]), np.array([1.0, 0.0, 1.0, 0.5])), "b": (np.array([5, 6, 6]), np.ones(3))}
    weights = group_resample_weights(group_index, 300, seed=3)
    per, macro = mean_intervals(items, weights, 0.9)
    draws = {"a": [], "b": []}
    for w in weights:
        for name, (scans, values) in items.items():
            copies = [v for s, v in zip(scans, values, strict=True) for _ in range(w[s])]
            draws[name].append(np.mean(copies) if copies else np.nan)
    for name in items:
        assert per[name] == pytest.approx(percentile_interval(np.array(draws[name]), 0.9))
    both = np.array(
        [np.nanmean([a, b]) if np.isfinite([a, b]).any() else np.nan for a, b in zip(*draws.values(), strict=True)]
    )
    assert macro == pytest.approx(percentile_interval(both, 0.9))


def test_group_bootstrap_draws_whole_groups_like_a_loop():
    from ctray.evaluate.bootstrap import group_resample_weights

    group_index = np.array([0, 0, 1, 2, 2, 2, 3])
    got = group_resample_weights(group_index, 50, seed=9)
    loop = np.random.default_rng(9)
    for b in range(50):
        drawn = loop.integers(0, 4, 4)
        want = np.array([np.sum(drawn == g) for g in group_index])
        assert list(got[b]) == list(want)


# The in-training evaluation ----------------------------------------------------------------------


def test_in_training_evaluation_scores_each_finding_by_its_own_label_column():
    """evaluate() (AnatomyTextTask's): finding columns follow cfg.findings even when a finding's
    anatomy is not evaluated, and the result is the per-template macro of the shared metrics."""
    tower = HashTower()
    gen = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(12, 1, DIM, generator=gen), dim=-1)
    cfg = ZeroShotConfig(findings={"gone": "brain", "liver_lesion": "liver"})
    labels = np.stack([np.full(12, -1), np.arange(12) % 2], 1)
    abnormal = labels[:, 1:]
    scans = AnatomyScans(v, np.ones((12, 1), bool), labels, list(cfg.findings), abnormal, ["liver"])
    ev = evaluate(scans, v[:, 0], np.zeros(12), Prompts(tower.embed_texts, 20.0), cfg, step=3)
    want = []
    for pos, neg in cfg.templates:
        p, n = tower.embed_texts(
            [pos.format(finding="liver lesion", anatomy="liver"), neg.format(finding="liver lesion", anatomy="liver")]
        )
        want.append(roc_auc_score(labels[:, 1], (20.0 * (v[:, 0].double() @ (p - n).double())).numpy()))
    assert ev.metrics["zs_finding_auroc_mean"] == pytest.approx(np.mean(want), abs=1e-9)
    assert ev.summary.startswith("eval step 3: zero-shot finding AUROC") and "\n" not in ev.summary
    assert ev.files["text_similarity.png"].startswith(b"\x89PNG")


# run_eval end to end -----------------------------------------------------------------------------

ANATOMIES = ["liver", "lung", "spleen"]
FINDINGS = {"liver_lesion": "liver", "lung_nodule": "lung", "splenomegaly": "spleen", "rare": "spleen"}


def write_embeddings(
    folder: Path,
    scans: int = 24,
    anatomy: bool = True,
    text: bool = True,
    unknown: bool = False,
    fixed: bool = True,
    groups: bool = True,
    **meta,
) -> str:
    """An embeddings folder as `ctray embed` writes it: two parts, embed.json. Anatomy embeddings
    cluster by anatomy and shift with their lesions; report texts are noisy copies of them."""
    rng = np.random.default_rng(0)
    a, f = len(ANATOMIES), len(FINDINGS)
    labels = (rng.random((scans, f)) < 0.4).astype(np.int8)
    labels[:2, :3] = [[0, 0, 0], [1, 1, 1]]
    labels[:, 3] = 0  # a finding without positives: skipped, and said so
    labels[5, 0] = -1
    centres, lesion = rng.normal(size=(a, DIM)), rng.normal(size=(a, DIM))
    region = rng.random((scans, a)) < 0.9
    abnormal = np.stack([labels[:, 0], labels[:, 1], labels[:, 2] | labels[:, 3]], 1)
    v = centres + 0.6 * abnormal[..., None] * lesion + 0.5 * rng.normal(size=(scans, a, DIM))
    v = (v / np.linalg.norm(v, axis=-1, keepdims=True) * region[..., None]).astype(np.float32)
    t = v + 0.3 * rng.normal(size=v.shape)
    present = region & (rng.random((scans, a)) < 0.8)
    t = (t / np.linalg.norm(t, axis=-1, keepdims=True) * present[..., None]).astype(np.float32)
    if unknown:
        labels[:], abnormal[:] = -1, -1
    scan = v.sum(1)
    scan = scan / np.linalg.norm(scan, axis=1, keepdims=True)

    def column(x: np.ndarray) -> pa.Array:  # fixed-size lists as `ctray embed` writes; else plain lists
        if not fixed:
            return pa.array(x.tolist())
        flat = pa.array(x.reshape(-1))
        for size in reversed(x.shape[1:]):
            flat = pa.FixedSizeListArray.from_arrays(flat, size)
        return flat

    cols = {
        "scan_id": [f"scan{i:03d}" for i in range(scans)],
        "embedding": column(scan.astype(np.float32)),
        "finding_labels": column(labels),
    }
    if anatomy:
        cols |= {"anatomy_embedding": column(v), "region": column(region), "abnormal": column(abnormal.astype(np.int8))}
    if text:
        cols |= {"text_embedding": column(t), "present": column(present)}
    if groups:  # three scans per patient
        cols["group"] = [f"patient{i // 3:03d}" for i in range(scans)]
    table = pa.table(cols)
    folder.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(scans)  # parts not in scan order: the reader sorts
    pq.write_table(table.take(order[: scans // 2]), folder / "part-00000.parquet")
    pq.write_table(table.take(order[scans // 2 :]), folder / "part-00001.parquet")
    info = {
        "objective": "cagcl" if text else ("totalfm_mae" if anatomy else "ctfm"),
        "export": str(folder / "export"),
        "dim": DIM,
        "anatomies": ANATOMIES if anatomy else None,
        "findings": list(FINDINGS),
        "finding_anatomies": FINDINGS if anatomy else {},
        "scans": scans,
    } | meta
    (folder / "embed.json").write_text(json.dumps(info))
    return str(folder)


def quick(folder: str, **kw) -> EvalReportConfig:
    return EvalReportConfig(
        embeddings=folder,
        bootstrap=200,
        probe=ProbeConfig(folds=3, labelled_fractions=[0.5, 1.0], knn_k=3),
        retrieval=RetrievalConfig(k=[1, 5], overlap_k=[1, 5]),
        **kw,
    )


def test_run_eval_writes_the_report_and_a_json_of_every_figure(tmp_path):
    folder = write_embeddings(tmp_path / "emb")
    # threshold: margin scores every scan, so AUROC equals scikit-learn's over all of them below
    result = run_eval(quick(folder, threshold="margin"), lambda uri, storage: HashTower())
    report = tmp_path / "emb" / "report"
    assert result.report == str(report / "report.md")
    pngs = {p.stem for p in report.glob("*.png")}
    assert pngs == {"roc", "text_similarity", "label_efficiency", "anatomy_tsne"}
    figures = json.loads((report / "figures.json").read_text())
    assert set(figures) == pngs and all(figures[k]["data"] for k in figures)
    md = (report / "report.md").read_text()
    assert all(f"({name}.png)" in md for name in pngs)
    assert "zero-shot finding rare: 0 positive of" in md and "one class, skipped" in md
    assert "\n" not in result.summary and result.summary.startswith("eval cagcl (24 scans): zero-shot finding AUROC")

    # The zero-shot numbers, recomputed with the tower and scikit-learn from the parquet files.
    m = result.metrics
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "emb").glob("part-*.parquet"))]).sort_by(
        "scan_id"
    )
    v = np.array(table.column("anatomy_embedding").to_pylist())
    region = np.array(table.column("region").to_pylist())
    labels = np.array(table.column("finding_labels").to_pylist())
    tower, cfg = HashTower(), ZeroShotConfig()
    per_template = []
    for pos, neg in cfg.templates:
        aucs = []
        for c, (f, anat) in enumerate(list(FINDINGS.items())[:3]):
            j = ANATOMIES.index(anat)
            ok = region[:, j] & (labels[:, c] >= 0)
            p, n = (
                tower.embed_texts([s.format(finding=f.replace("_", " "), anatomy=anat) for s in (pos, neg)])
                .double()
                .numpy()
            )
            aucs.append(roc_auc_score(labels[ok, c], v[ok, j] @ (p - n) / tower.temperature))
        per_template.append(np.mean(aucs))
    assert m["zs_finding_auroc_mean"] == pytest.approx(np.mean(per_template), abs=1e-9)
    assert m["zs_finding_auroc_std"] == pytest.approx(np.std(per_template), abs=1e-9)
    assert m["zs_finding_auroc_ci_low"] <= m["zs_finding_auroc_mean"] <= m["zs_finding_auroc_ci_high"]
    roc = figures["roc"]["data"]["finding"]["liver_lesion"]
    assert len(roc["fpr"]) == len(roc["tpr"]) and 0 <= roc["auroc"] <= 1

    for key in (
        "probe_linear_finding_auroc",
        "probe_knn_anatomy_auroc@0.5",
        "retrieval_finding_p@5",
        "retrieval_anatomy_p@1",
        "text_to_scan_r@5",
        "text_cos_mean",
    ):
        assert math.isfinite(m[key]), key
    assert m["retrieval_anatomy_p@1"] > 0.9  # anatomy embeddings cluster by anatomy
    assert figures["label_efficiency"]["data"]["fractions"] == [0.5, 1.0]
    assert json.loads((report / "metrics.json").read_text())["metrics"]["zs_finding_auroc_mean"] == pytest.approx(
        m["zs_finding_auroc_mean"]
    )


def test_threshold_protocols_tune_where_they_say():
    """validation: ROC-corner thresholds from the held-out groups, metrics on the rest only;
    test_roc_corner: the corner of the scored scans themselves (a naive sweep over thresholds)."""
    from ctray.evaluate.thresholds import apply_protocol

    rng = np.random.default_rng(6)
    n = 40
    labels = (rng.random(n) < 0.5).astype(int)
    margins = np.stack([labels + rng.normal(size=n), labels + 2 * rng.normal(size=n)])  # 2 templates
    item = ItemScores("finding", "f", "liver", np.arange(n), labels, margins)
    groups = np.arange(n) // 2

    def corner(m: np.ndarray, y: np.ndarray) -> float:  # the threshold nearest (FPR 0, TPR 1), naively
        best = min(
            np.unique(m),
            key=lambda t: np.hypot(
                ((m >= t) & (y == 0)).sum() / (y == 0).sum(), 1 - ((m >= t) & (y == 1)).sum() / y.sum()
            ),
        )
        return float(best)

    (tuned,), line = apply_protocol([item], "test_roc_corner", groups, 0.3, seed=0)
    assert "OPTIMISTIC" in line and len(tuned.labels) == n
    for t, m in enumerate(margins):
        got = tuned.per_template()["sensitivity"][t]
        want = ((m >= corner(m, labels)) & (labels == 1)).sum() / labels.sum()
        assert got == pytest.approx(want)

    (held,), line = apply_protocol([item], "validation", groups, 0.3, seed=0)
    assert "6 of 20 groups" in line and len(held.labels) == n - 12
    validation = np.setdiff1d(np.arange(n), held.scans)
    assert set(groups[validation]).isdisjoint(groups[held.scans])  # whole groups on either side
    for t, m in enumerate(margins):
        cut = corner(m[validation], labels[validation])
        pred = held.margins[t] >= cut
        want = (pred & (held.labels == 1)).sum() / held.labels.sum()
        assert held.per_template()["sensitivity"][t] == pytest.approx(want)

    (plain,), line = apply_protocol([item], "margin", groups, 0.3, seed=0)
    assert plain.thresholds is None and "margin > 0" in line
    # An item none of whose scans fall in the validation split keeps margin > 0 and says so.
    lone = ItemScores("finding", "g", "liver", held.scans[:6], held.labels[:6], held.margins[:, :6])
    (kept,), line = apply_protocol([lone], "validation", groups, 0.3, seed=0)
    assert kept.thresholds is None and len(kept.labels) == 6 and "1 item(s) with one class" in line


def test_groups_reach_the_report_and_parts_without_them_are_each_scan_alone(tmp_path, caplog):
    grouped = run_eval(quick(write_embeddings(tmp_path / "grouped", anatomy=False, text=False)))
    report = Path(grouped.report).read_text()
    assert "over 8 groups of 24 scans" in report and "(chance" in report and "zero embedding" not in report
    assert 0 < grouped.metrics["retrieval_finding_p@1_chance"] < 1
    with caplog.at_level(logging.WARNING, logger="ctray"):
        alone = run_eval(quick(write_embeddings(tmp_path / "alone", anatomy=False, text=False, groups=False)))
    assert "has no group column (embedded before groups): each scan is its own group" in caplog.text
    assert "over 24 groups of 24 scans" in Path(alone.report).read_text()


def test_scans_without_an_embedding_are_left_out_and_counted(tmp_path, caplog):
    """An anatomy objective's scan with no anatomy in the image has a zero embedding: it enters no
    probe or retrieval, and the report says how many there were and how often each anatomy shows."""
    folder = Path(write_embeddings(tmp_path / "emb", text=False))
    first = sorted(folder.glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    zero = pa.array([[0.0] * DIM, *table.column("embedding").to_pylist()[1:]], pa.list_(pa.float32(), DIM))
    pq.write_table(table.set_column(table.column_names.index("embedding"), "embedding", zero), first)
    with caplog.at_level(logging.WARNING, logger="ctray"):
        result = run_eval(quick(str(folder), out=str(tmp_path / "out")))
    assert "1 scan(s) have a zero embedding" in caplog.text
    report = (tmp_path / "out" / "report.md").read_text()
    assert "1 scan(s) with no anatomy in the image (a zero embedding): left out" in report
    assert "scans showing each anatomy (of 24): liver " in report
    emb = load_embeddings(str(folder), StorageConfig())
    assert all(len(t.y) <= int(emb.embedded.sum()) for t in probe_tasks(emb) if t.family == "finding")
    assert math.isfinite(result.metrics["probe_linear_finding_auroc"])


def test_scan_level_embeddings_get_probes_and_retrieval_only(tmp_path):
    folder = write_embeddings(tmp_path / "ctfm", anatomy=False, text=False, fixed=False)  # variable-size lists
    result = run_eval(quick(folder, out=str(tmp_path / "out")))  # no text tower needed, none loaded
    assert not any(k.startswith("zs_") for k in result.metrics)
    assert math.isfinite(result.metrics["probe_linear_finding_auroc"])
    assert {p.stem for p in (tmp_path / "out").glob("*.png")} == {"label_efficiency"}
    assert "no anatomy map" in (tmp_path / "out" / "report.md").read_text()


def test_bad_inputs_give_one_line_errors(tmp_path):
    def error(cfg: EvalReportConfig, tower=None) -> str:
        with pytest.raises(ConfigError) as e:
            run_eval(cfg, lambda uri, storage: tower or HashTower())
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "no embed.json" in error(quick(str(tmp_path / "nothing")))
    unlabelled = write_embeddings(tmp_path / "unlabelled", unknown=True)
    assert "no finding labels (every finding_labels entry is -1)" in error(quick(unlabelled))
    assert "text tower embeds in 8 dimensions, the embeddings" in error(
        quick(write_embeddings(tmp_path / "ok")), HashTower(dim=8)
    )
    wrong = write_embeddings(tmp_path / "wrong", dim=32)
    assert "embedding has 16 dimensions, embed.json says 32" in error(quick(wrong))
    # A part left from a shard that was rewritten since holds scans another part holds too.
    twice = Path(write_embeddings(tmp_path / "twice"))
    first = sorted(twice.glob("part-*.parquet"))[0]
    (twice / "part-stale.parquet").write_bytes(first.read_bytes())
    rows = pq.read_metadata(first).num_rows
    assert f"{rows} scan id(s) appear in more than one part" in error(quick(str(twice)))


def test_ctfm_protocol_with_a_gallery_folder_numbers_groups_across_both(tmp_path):
    """retrieval.gallery: the evaluation scans query another embeddings folder. Given the evaluation
    folder itself, every query's patient is in the gallery and is left out (groups are matched by
    name across the two folders), so CT-FM's P@k equals the leave-one-group-out P@k."""
    folder = write_embeddings(tmp_path / "emb", anatomy=False, text=False)
    cfg = quick(folder).model_copy(update={"retrieval": RetrievalConfig(k=[1, 5], overlap_k=[5], gallery=folder)})
    result = run_eval(cfg)
    for k in (1, 5):
        assert result.metrics[f"retrieval_ctfm_finding_p@{k}"] == pytest.approx(
            result.metrics[f"retrieval_finding_p@{k}"]
        )
        assert 0 <= result.metrics[f"retrieval_ctfm_finding_ap@{k}"] <= 1
    assert f"the 24 embedded scans of {folder}" in Path(result.report).read_text()
