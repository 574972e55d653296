"""Zero-shot evaluation of anatomy-level vision-text models (TotalFM stage 2, CA-GCL): the one
place of its metric code, shared by the in-training evaluation (AnatomyTextTask.evaluate ->
`evaluate`) and the offline report (ctray.evaluate, which adds bootstrap CIs, curves and probes).

For a finding f of anatomy a and a prompt template pair (present, absent), a scan's score is the
logit margin of the "present" prompt given the scan's anatomy-a embedding, scale x (cos present -
cos absent): the log-odds of CLIP-style zero-shot (as in fVLM and CA-GCL), which ranks like the
softmax probability but does not saturate. Two tasks:
- finding-wise: every finding label of the shards (finding -> anatomy from the config);
- anatomy-wise lesion presence: the anatomy is abnormal when any finding mapped to it is present.
Per template: the METRICS (AUROC, balanced accuracy, weighted F1 as the papers report, and
sensitivity, specificity, precision; threshold: margin > 0), macro-averaged over findings
(anatomies); then mean and std over templates (CA-GCL's robustness to prompts).

The collapse diagnostic (CA-GCL Fig. 1): the distribution of cosine similarity between the text
embeddings of different anatomies, over the evaluation reports; its mean, std and a histogram.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ctray.evaluate.config import ZeroShotConfig
from ctray.evaluate.result import Evaluation


class TextTower(Protocol):
    """The text side of a CLIP-type export, as zero-shot needs it."""

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (N, D) L2-normalised text embeddings."""
        ...

    @property
    def temperature(self) -> float:
        """The learned tau; the logit scale is 1 / tau."""
        ...


TextEmbedder = Callable[[list[str]], torch.Tensor]
"""Texts -> (N, D) L2-normalised text embeddings."""

TASKS = ("finding", "anatomy")

METRICS = ("auroc", "balanced_accuracy", "weighted_f1", "sensitivity", "specificity", "precision")
"""Per finding (anatomy), then macro-averaged: CA-GCL and fVLM report AUROC, balanced accuracy
and weighted F1; sensitivity, specificity and precision complete the confusion matrix."""


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN with one class."""
    from scipy.stats import rankdata

    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    return np.divide(num, den, out=np.full(num.shape, empty), where=den > 0)


def _weighted_auroc(margin: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each weighted copy: P(positive margin > negative margin) + 1/2 P(tie),
    over the scans' margin levels, so that bootstrap resamples need no sort of their own."""
    order = np.argsort(margin, kind="stable")
    sorted_margin = margin[order]
    starts = np.flatnonzero(np.r_[True, sorted_margin[1:] != sorted_margin[:-1]])
    pos = np.add.reduceat((weights * y)[:, order], starts, axis=1)  # (B, levels)
    neg = np.add.reduceat((weights * ~y)[:, order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    return _ratio((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1), np.nan)


def weighted_metrics(
    margin: np.ndarray, labels: np.ndarray, weights: np.ndarray, threshold: float = 0.0
) -> dict[str, np.ndarray]:
    """margin (n,) logit margins, labels (n,) 0/1, weights (B, n) scan multiplicities -> each of
    METRICS as a (B,) array: the metrics of B weighted copies of the scans. Bootstrap resamples are
    such copies (weights = how often each scan was drawn), so the report's CIs and the point
    estimates share these formulas. NaN for a copy with only one class.

    AUROC ranks the margins themselves: a softmax probability rounds to 1.0 in float32 once
    scale x cosine margin passes ~17, which would tie sharpened models' scores and lower their
    AUROC with unchanged rankings. The thresholded metrics use margin > 0 (probability > 0.5).
    Weighted F1 is the F1 of each class weighted by its support (scikit-learn's "weighted")."""
    y = labels.astype(bool)
    pred = margin > threshold
    w = weights.astype(np.float64)
    tp, fn = w @ (pred & y), w @ (~pred & y)
    fp, tn = w @ (pred & ~y), w @ (~pred & ~y)
    sensitivity, specificity = _ratio(tp, tp + fn, np.nan), _ratio(tn, tn + fp, np.nan)
    f1_pos, f1_neg = _ratio(2 * tp, 2 * tp + fp + fn, 0.0), _ratio(2 * tn, 2 * tn + fn + fp, 0.0)
    out = {
        "auroc": _weighted_auroc(margin, y, w),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "weighted_f1": _ratio(f1_pos * (tp + fn) + f1_neg * (tn + fp), w.sum(1), np.nan),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp, 0.0),
    }
    one_class = (tp + fn == 0) | (tn + fp == 0)
    return {m: np.where(one_class, np.nan, v) for m, v in out.items()}


def classification_metrics(margin: np.ndarray, labels: np.ndarray, threshold: float = 0.0) -> dict[str, float]:
    """Binary metrics (METRICS) of logit margins (> threshold: "present") against 0/1 labels with
    both classes; see weighted_metrics."""
    ones = np.ones((1, len(margin)))
    return {m: float(v[0]) for m, v in weighted_metrics(margin, labels, ones, threshold).items()}


def roc_corner_threshold(margin: np.ndarray, labels: np.ndarray) -> float:
    """The margin threshold whose (FPR, TPR) is closest to the ROC curve's corner (0, 1), as fVLM
    and CT-CLIP choose theirs; 0 when the labels have one class."""
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2:
        return 0.0
    fpr, tpr, thresholds = roc_curve(labels, margin)
    best = int(np.argmin(np.hypot(fpr, 1 - tpr)))
    # roc_curve's thresholds predict positive at margin >= t; ours at margin > threshold.
    return float(np.nextafter(thresholds[best], -np.inf))


def logit_margins(v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> np.ndarray:
    """(N, D) image embeddings, (D,) prompt embeddings -> scale x (cos(v, present) - cos(v, absent))
    in float64: the log-odds of "present" under the two-prompt softmax, without its saturation."""
    return (scale * (v.double() @ pos.double() - v.double() @ neg.double())).cpu().numpy()


@dataclass(frozen=True)
class ItemScores:
    """One zero-shot item (a finding, or an anatomy's lesion presence) over the evaluation scans
    that show its anatomy and have its label."""

    task: str
    """"finding" or "anatomy" (TASKS)."""
    item: str
    """The finding label, or "<anatomy> (any finding)"."""
    anatomy: str
    scans: np.ndarray
    """(n,) indices of the scans scored."""
    labels: np.ndarray
    """(n,) 0/1."""
    margins: np.ndarray
    """(T, n) logit margins, one row per template."""
    thresholds: np.ndarray | None = None
    """(T,) margin thresholds of the thresholded metrics, per template (None: 0, probability > 0.5)."""

    def threshold(self, template: int) -> float:
        return 0.0 if self.thresholds is None else float(self.thresholds[template])

    @property
    def scorable(self) -> bool:
        """Both classes among the scans: the metrics are defined."""
        return len(self.labels) >= 2 and 0 < int(self.labels.sum()) < len(self.labels)

    def per_template(self) -> dict[str, np.ndarray]:
        """METRICS -> (T,) values, one per template."""
        per = [classification_metrics(m, self.labels, self.threshold(t)) for t, m in enumerate(self.margins)]
        return {m: np.array([p[m] for p in per]) for m in METRICS}


ItemSpec = tuple[str, int, str, str, int]
"""(title, anatomy index, anatomy name, finding phrase, label column)."""


@dataclass(frozen=True)
class AnatomyScans:
    """The evaluation scans as zero-shot scores them."""

    embeddings: torch.Tensor
    """(S, A, D) L2-normalised anatomy embeddings."""
    region: np.ndarray
    """(S, A) bool: the anatomy is in the image."""
    finding_labels: np.ndarray
    """(S, F) in {-1, 0, 1}; columns: `findings`."""
    findings: list[str]
    """The finding label of each column of `finding_labels`."""
    abnormal: np.ndarray
    """(S, A) in {-1, 0, 1}: any finding mapped to the anatomy is present."""
    anatomies: list[str]
    """The anatomy of each column of `region` and `abnormal`."""


@dataclass(frozen=True)
class Prompts:
    """How prompts are embedded and scored: the text tower and its logit scale (1 / tau)."""

    embed_texts: TextEmbedder
    scale: float


def zero_shot_scores(scans: AnatomyScans, prompts: Prompts, cfg: ZeroShotConfig) -> list[ItemScores]:
    """Every finding column whose anatomy (cfg.findings) is one of the scans' anatomies, then every
    anatomy's lesion presence -> its logit margins per template (items with one class included; see
    ItemScores.scorable)."""
    v, region, finding_labels, abnormal = scans.embeddings, scans.region, scans.finding_labels, scans.abnormal
    anatomies, finding_columns = scans.anatomies, scans.findings
    index = {a: j for j, a in enumerate(anatomies)}
    specs: list[tuple[str, ItemSpec]] = [
        ("finding", (f, index[cfg.findings[f]], cfg.findings[f], f.replace("_", " "), c))
        for c, f in enumerate(finding_columns)
        if cfg.findings.get(f) in index
    ]
    specs += [("anatomy", (f"{a} (any finding)", j, a, cfg.lesion_term, j)) for j, a in enumerate(anatomies)]
    if not specs:
        return []
    texts = [
        t.format(finding=phrase, anatomy=anat)
        for _, (title, _, anat, phrase, _) in specs
        for pair in cfg.templates
        for t in cfg.finding_prompts.get(title, pair)
    ]
    emb = prompts.embed_texts(texts).reshape(len(specs), len(cfg.templates), 2, -1)
    items = []
    for k, (task, (title, j, anat, _, col)) in enumerate(specs):
        labels = finding_labels if task == "finding" else abnormal
        ok = region[:, j] & (labels[:, col] >= 0)
        rows = np.flatnonzero(ok)
        vj = v[torch.as_tensor(rows, device=v.device), j]
        margins = np.stack(
            [logit_margins(vj, emb[k, t, 0], emb[k, t, 1], prompts.scale) for t in range(len(cfg.templates))]
        )
        items.append(ItemScores(task, title, anat, rows, labels[rows, col].astype(int), margins))
    return items


def template_rows(items: list[ItemScores]) -> list[dict[str, Any]]:
    """One row per task and template: METRICS macro-averaged over the scorable items, and each
    item's own values under "items"."""
    rows = []
    for task in TASKS:
        mine = [(it, it.per_template()) for it in items if it.task == task and it.scorable]
        if not mine:
            continue
        for t in range(len(mine[0][0].margins)):
            per = [{"item": it.item, **{m: float(v[m][t]) for m in METRICS}, "n": len(it.labels)} for it, v in mine]
            macro = {m: float(np.mean([p[m] for p in per])) for m in METRICS}
            rows.append({"task": task, "template": t, **macro, "items": per})
    return rows


def template_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """zs_<task>_<metric>_mean and _std over the templates' macro rows (NaN for a task without one)."""
    metrics: dict[str, float] = {}
    for task in TASKS:
        for m in METRICS:
            vals = [r[m] for r in rows if r["task"] == task]
            metrics[f"zs_{task}_{m}_mean"] = float(np.mean(vals)) if vals else float("nan")
            metrics[f"zs_{task}_{m}_std"] = float(np.std(vals)) if vals else float("nan")
    return metrics


def evaluate(
    scans: AnatomyScans, texts: torch.Tensor, text_anatomy: np.ndarray, prompts: Prompts, cfg: ZeroShotConfig, step: int
) -> Evaluation:
    """The in-training evaluation: zero-shot scores of `scans` (cfg.findings in order as their
    finding columns), and the collapse diagnostic over texts (T, D), the embeddings of their
    reports' anatomy texts, with text_anatomy (T,) the anatomy index of each."""
    from ctray.evaluate.plots import similarity_histogram  # matplotlib only when an evaluation runs

    items = zero_shot_scores(scans, prompts, cfg)
    rows = template_rows(items)
    metrics = template_summary(rows)
    sims = cross_anatomy_similarity(texts, text_anatomy)
    metrics["text_cos_mean"] = float(sims.mean()) if len(sims) else float("nan")
    metrics["text_cos_std"] = float(sims.std()) if len(sims) else float("nan")

    report = {
        "step": step,
        "scans": len(scans.region),
        "metrics": metrics,
        "templates": [list(t) for t in cfg.templates],
        "per_template": rows,
    }
    files = {
        "zero_shot.json": json.dumps(report, indent=1).encode(),
        "zero_shot.md": markdown_table(rows, metrics, step).encode(),
        "text_similarity.png": similarity_histogram(sims, f"text embedding collapse at step {step}").png,
    }
    z = metrics
    summary = (
        f"eval step {step}: zero-shot finding AUROC "
        f"{z['zs_finding_auroc_mean']:.3f} ± {z['zs_finding_auroc_std']:.3f}, "
        f"anatomy AUROC {z['zs_anatomy_auroc_mean']:.3f} ± {z['zs_anatomy_auroc_std']:.3f} "
        f"(over {len(cfg.templates)} templates); text cos(different anatomies) "
        f"{z['text_cos_mean']:.3f} ± {z['text_cos_std']:.3f}"
    )
    return Evaluation(metrics, summary, files)


def cross_anatomy_similarity(text_emb: torch.Tensor, text_anatomy: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of texts that describe different anatomies."""
    if len(text_emb) < 2:
        return np.zeros(0)
    sim = (text_emb.float() @ text_emb.float().T).cpu().numpy()
    a = np.asarray(text_anatomy)
    upper = np.triu(np.ones_like(sim, dtype=bool), k=1) & (a[:, None] != a[None, :])
    return sim[upper]


def markdown_table(rows: list[dict], metrics: dict[str, float], step: int) -> str:
    head = " | ".join(m.replace("_", " ") for m in METRICS)
    lines = [
        f"# Zero-shot evaluation at step {step}",
        "",
        f"| task | template | {head} |",
        "| --- " * (2 + len(METRICS)) + "|",
    ]
    lines += [f"| {r['task']} | {r['template']} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |" for r in rows]
    lines += ["", f"| task | {head} (mean ± std over templates) |", "| --- " * (1 + len(METRICS)) + "|"]
    for task in TASKS:
        cells = [f"{metrics[f'zs_{task}_{m}_mean']:.3f} ± {metrics[f'zs_{task}_{m}_std']:.3f}" for m in METRICS]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Text embeddings of different anatomies: cosine similarity "
        f"mean {metrics['text_cos_mean']:.3f}, std {metrics['text_cos_std']:.3f}",
        "",
    ]
    return "\n".join(lines)
