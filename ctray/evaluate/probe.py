"""Linear probe and kNN on frozen embeddings (scikit-learn), stratified k-fold cross-validated,
with the label-efficiency curve: each training fold subsampled to a labelled fraction, the test
fold kept whole. A fold's scores are scikit-learn's scorers (roc_auc, balanced_accuracy), so a
fraction of 1 is exactly cross_val_score with the same splitter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ctray.evaluate.config import ProbeConfig
from ctray.evaluate.embeddings import Embeddings

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

    @property
    def minority(self) -> int:
        return int(min(self.y.sum(), len(self.y) - self.y.sum()))


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


def probe_tasks(emb: Embeddings) -> list[ProbeTask]:
    """Every finding on the scan embeddings; with anatomy embeddings, every anatomy's lesion
    presence on its own embedding (scans showing it)."""
    tasks = []
    for c, f in enumerate(emb.findings):
        ok = emb.finding_labels[:, c] >= 0
        tasks.append(ProbeTask("finding", f, emb.embedding[ok], emb.finding_labels[ok, c].astype(int)))
    if emb.anatomy_embedding is not None and emb.region is not None and emb.abnormal is not None:
        for j, a in enumerate(emb.anatomies):
            ok = emb.region[:, j] & (emb.abnormal[:, j] >= 0)
            tasks.append(ProbeTask("anatomy", a, emb.anatomy_embedding[ok, j], emb.abnormal[ok, j].astype(int)))
    return tasks


def estimator(kind: Kind, cfg: ProbeConfig, n_train: int) -> Any:
    """The probe: logistic regression on standardised features (class-balanced, as rare findings
    would otherwise be predicted absent everywhere and score a balanced accuracy of 0.5), or a
    distance-weighted cosine kNN with k capped to the training scans (weighted, so that a k as large
    as a small labelled subset still ranks the test scans instead of giving them all one vote)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "knn":
        return KNeighborsClassifier(n_neighbors=min(cfg.knn_k, n_train), metric="cosine", weights="distance")
    return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, class_weight="balanced"))


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


def cross_validate(
    task: ProbeTask, kind: Kind, cfg: ProbeConfig, folds: int, fraction: float, seed: int
) -> dict[str, float]:
    """SCORES averaged over stratified folds (shuffled with the seed); the training fold reduced to
    `fraction` (drawn with (seed, fold)). NaN when no fold's training part has both classes."""
    from sklearn.metrics import get_scorer
    from sklearn.model_selection import StratifiedKFold

    scorers = {"auroc": get_scorer("roc_auc"), "balanced_accuracy": get_scorer("balanced_accuracy")}
    per: dict[str, list[float]] = {s: [] for s in SCORES}
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(task.x, task.y)
    for fold, (train, test) in enumerate(splits):
        train = labelled_subset(train, task.y, fraction, np.random.default_rng((seed, fold)))
        if len(np.unique(task.y[train])) < 2:
            continue
        model = estimator(kind, cfg, len(train)).fit(task.x[train], task.y[train])
        for s, scorer in scorers.items():
            per[s].append(float(scorer(model, task.x[test], task.y[test])))
    return {s: float(np.mean(v)) if v else float("nan") for s, v in per.items()}


def run_probes(tasks: list[ProbeTask], cfg: ProbeConfig, seed: int) -> tuple[list[ProbeRow], list[str]]:
    """Every task x probe kind x labelled fraction -> rows, and one note per task skipped (fewer
    than 2 scans of a class: no stratified split)."""
    rows, skipped = [], []
    for task in tasks:
        folds = min(cfg.folds, task.minority)
        if folds < 2:
            skipped.append(
                f"probe {task.family} {task.name}: {int(task.y.sum())} positive of {len(task.y)} labelled scans "
                "(needs >= 2 of each class)"
            )
            continue
        for kind in KINDS:
            for fraction in cfg.labelled_fractions:
                s = cross_validate(task, kind, cfg, folds, fraction, seed)
                rows.append(ProbeRow(task.family, task.name, kind, fraction, folds, s["auroc"], s["balanced_accuracy"]))
        log.info("eval: probes of %s %s done (%d folds)", task.family, task.name, folds)
    return rows, skipped
