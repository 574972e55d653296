"""Linear probe and kNN on frozen embeddings (scikit-learn), stratified group k-fold
cross-validated (a patient's scans never on both sides of a split: several reconstructions of one
scan would otherwise score each other), with the label-efficiency curve: each training fold
subsampled to a labelled fraction, the test fold kept whole. A fold's scores are scikit-learn's
scorers (roc_auc, balanced_accuracy), so a fraction of 1 is exactly cross_val_score with the same
splitter; the report gives their mean and standard deviation over the folds, and for AUROC an
interval from a bootstrap over groups of the pooled out-of-fold scores (each scan scored by the
model of the fold that held it out). The linear probe chooses its C inside each training fold
(LogisticRegressionCV over group folds of that fold)."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ctray.evaluate.bootstrap import Interval, group_resample_weights, percentile_interval
from ctray.evaluate.config import ProbeConfig
from ctray.evaluate.embeddings import Embeddings
from ctray.evaluate.zeroshot import weighted_metrics

log = logging.getLogger("ctray")

Kind = Literal["linear", "knn"]
KINDS: tuple[Kind, ...] = ("linear", "knn")
SCORES = ("auroc", "balanced_accuracy")


@dataclass(frozen=True)
class ProbeTask:
    """One binary label over the scans that have it."""

    family: str
    """"finding" (scan embeddings, one finding label) or "anatomy" (that anatomy's embeddings,
    its lesion presence)."""
    name: str
    x: np.ndarray
    """(n, D) features."""
    y: np.ndarray
    """(n,) 0/1."""
    groups: np.ndarray
    """(n,) group (patient or study) index of each scan."""

    @property
    def minority(self) -> int:
        """Groups with a scan of the rarer class: the most folds a stratified group split can make."""
        return min(len(np.unique(self.groups[self.y == c])) for c in (0, 1))


@dataclass(frozen=True)
class ProbeRow:
    """Cross-validated scores of one probe on one task at one labelled fraction."""

    family: str
    name: str
    kind: str
    fraction: float
    folds: int
    auroc: float
    balanced_accuracy: float
    auroc_std: float
    """Standard deviation over the folds."""
    balanced_accuracy_std: float
    auroc_ci: Interval = (float("nan"), float("nan"))
    """Interval of the pooled out-of-fold AUROC over resampled groups (at the largest labelled
    fraction, with bootstrap resamples; NaN otherwise)."""


@dataclass(frozen=True)
class FoldScores:
    """A cross-validation's results."""

    per_fold: dict[str, list[float]]
    """SCORES -> one value per fold that had both classes on both sides."""
    out_of_fold: np.ndarray
    """(n,) each scan's score (decision function, else positive-class probability, as scikit-learn's
    roc_auc scorer takes) from the model of the fold that held it out; NaN in skipped folds."""


def probe_tasks(emb: Embeddings) -> list[ProbeTask]:
    """Every finding on the scan embeddings (scans without one left out: Embeddings.embedded); with
    anatomy embeddings, every anatomy's lesion presence on its own embedding (scans showing it)."""
    tasks = []
    groups = emb.group_index
    for c, f in enumerate(emb.findings):
        ok = (emb.finding_labels[:, c] >= 0) & emb.embedded
        tasks.append(ProbeTask("finding", f, emb.embedding[ok], emb.finding_labels[ok, c].astype(int), groups[ok]))
    if emb.anatomy_embedding is not None and emb.region is not None and emb.abnormal is not None:
        for j, a in enumerate(emb.anatomies):
            ok = emb.region[:, j] & (emb.abnormal[:, j] >= 0)
            x, y = emb.anatomy_embedding[ok, j], emb.abnormal[ok, j].astype(int)
            tasks.append(ProbeTask("anatomy", a, x, y, groups[ok]))
    return tasks


def estimator(kind: Kind, cfg: ProbeConfig, y: np.ndarray, groups: np.ndarray, seed: int) -> Any:
    """The probe for a training fold (labels y, groups): logistic regression on standardised
    features (class-balanced, as rare findings would otherwise be predicted absent everywhere and
    score a balanced accuracy of 0.5) with C chosen from cfg.cs by AUROC over group folds of the
    training fold, or a distance-weighted cosine kNN with k capped to the training scans (weighted,
    so that a k as large as a small labelled subset still ranks the test scans instead of giving
    them all one vote). The scaler sees the whole training fold before C is chosen: it only centres
    and scales, and the test fold never reaches it."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "knn":
        return KNeighborsClassifier(n_neighbors=min(cfg.knn_k, len(y)), metric="cosine", weights="distance")
    inner = min(cfg.inner_folds, *(len(np.unique(groups[y == c])) for c in (0, 1)))
    splits = []
    if len(cfg.cs) > 1 and inner >= 2:
        # Inner folds with both classes on both sides only: AUROC is undefined on the others.
        every = StratifiedGroupKFold(n_splits=inner, shuffle=True, random_state=seed).split(y, y, groups)
        splits = [(tr, te) for tr, te in every if len(np.unique(y[tr])) == 2 and len(np.unique(y[te])) == 2]
    if len(splits) < 2:
        model: Any = LogisticRegression(C=cfg.cs[len(cfg.cs) // 2], max_iter=cfg.max_iter, class_weight="balanced")
    else:
        # scikit-learn >= 1.8 warns on every fit until these transition parameters are set (L2 only,
        # the new fitted attributes); older versions do not know them.
        params = inspect.signature(LogisticRegressionCV).parameters
        settled = {k: v for k, v in (("l1_ratios", (0.0,)), ("use_legacy_attributes", False)) if k in params}
        model = LogisticRegressionCV(
            Cs=cfg.cs, cv=splits, scoring="roc_auc", max_iter=cfg.max_iter, class_weight="balanced", **settled
        )
    return make_pipeline(StandardScaler(), model)


def labelled_subset(train: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """`fraction` of the training indices, per class (at least one of each), in their order."""
    if fraction >= 1:
        return train
    keep = []
    for c in (0, 1):
        members = train[y[train] == c]
        n = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=min(n, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def _score(model: Any, x: np.ndarray) -> np.ndarray:
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(x), dtype=np.float64)
    return np.asarray(model.predict_proba(x)[:, 1], dtype=np.float64)


def cross_validate(task: ProbeTask, kind: Kind, cfg: ProbeConfig, folds: int, fraction: float, seed: int) -> FoldScores:
    """Scores per stratified group fold (shuffled with the seed) and out of fold; the training fold
    reduced to `fraction` (drawn with (seed, fold)); folds whose training part or test part lacks
    a class are left out."""
    from sklearn.metrics import get_scorer
    from sklearn.model_selection import StratifiedGroupKFold

    scorers = {"auroc": get_scorer("roc_auc"), "balanced_accuracy": get_scorer("balanced_accuracy")}
    per: dict[str, list[float]] = {s: [] for s in SCORES}
    out_of_fold = np.full(len(task.y), np.nan)
    splits = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(task.x, task.y, task.groups)
    for fold, (train, test) in enumerate(splits):
        train = labelled_subset(train, task.y, fraction, np.random.default_rng((seed, fold)))
        if len(np.unique(task.y[train])) < 2 or len(np.unique(task.y[test])) < 2:
            continue
        model = estimator(kind, cfg, task.y[train], task.groups[train], seed).fit(task.x[train], task.y[train])
        for s, scorer in scorers.items():
            per[s].append(float(scorer(model, task.x[test], task.y[test])))
        out_of_fold[test] = _score(model, task.x[test])
    return FoldScores(per, out_of_fold)


def pooled_auroc_interval(task: ProbeTask, scores: np.ndarray, resamples: int, seed: int, ci: float) -> Interval:
    """Interval of the AUROC of the out-of-fold scores over `resamples` draws of the task's groups."""
    ok = np.isfinite(scores)
    if not resamples or len(np.unique(task.y[ok])) < 2:
        return float("nan"), float("nan")
    group_index = np.unique(task.groups[ok], return_inverse=True)[1]
    weights = group_resample_weights(group_index, resamples, seed)
    return percentile_interval(weighted_metrics(scores[ok], task.y[ok], weights)["auroc"], ci)


def run_probes(
    tasks: list[ProbeTask], cfg: ProbeConfig, seed: int, resamples: int = 0, ci: float = 0.95
) -> tuple[list[ProbeRow], list[str]]:
    """Every task x probe kind x labelled fraction -> rows, and one note per task skipped (fewer
    than 2 groups of a class: no stratified group split). `resamples` > 0: the rows at the largest
    fraction carry their AUROC interval over resampled groups."""
    rows, skipped = [], []
    for task in tasks:
        folds = min(cfg.folds, task.minority)
        if folds < 2:
            skipped.append(
                f"probe {task.family} {task.name}: {int(task.y.sum())} positive of {len(task.y)} labelled scans "
                "(needs >= 2 groups of each class)"
            )
            continue
        for kind in KINDS:
            for fraction in cfg.labelled_fractions:
                scores = cross_validate(task, kind, cfg, folds, fraction, seed)
                s = scores.per_fold
                mean = {k: float(np.mean(v)) if v else float("nan") for k, v in s.items()}
                std = {k: float(np.std(v)) if v else float("nan") for k, v in s.items()}
                last = fraction == cfg.labelled_fractions[-1]
                interval = pooled_auroc_interval(task, scores.out_of_fold, resamples if last else 0, seed, ci)
                rows.append(
                    ProbeRow(
                        task.family,
                        task.name,
                        kind,
                        fraction,
                        folds,
                        mean["auroc"],
                        mean["balanced_accuracy"],
                        std["auroc"],
                        std["balanced_accuracy"],
                        interval,
                    )
                )
        log.info("eval: probes of %s %s done (%d folds)", task.family, task.name, folds)
    return rows, skipped
