"""Zero-shot evaluation of anatomy-level vision-text models (TotalFM stage 2, CA-GCL).

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

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ctray.anatomy import DEFAULT_FINDINGS
from ctray.config import Section
from ctray.objectives.spec import Evaluation

DEFAULT_TEMPLATES = [
    ("{finding} in the {anatomy}.", "no {finding} in the {anatomy}."),
    ("There is {finding} in the {anatomy}.", "There is no {finding} in the {anatomy}."),
    ("The {anatomy} shows {finding}.", "The {anatomy} shows no {finding}."),
    ("Evidence of {finding}.", "No evidence of {finding}."),
    ("{finding} is present.", "{finding} is absent."),
    ("Findings consistent with {finding} in the {anatomy}.", "The {anatomy} is normal."),
]


class ZeroShotConfig(Section):
    """Zero-shot evaluation prompts and the finding labels they are scored against."""

    findings: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_FINDINGS))
    """Finding label (a `labels` name in the shards) -> the anatomy whose embedding scores it.
    Default: ctray.anatomy.DEFAULT_FINDINGS (the phantoms draw theirs from it); real data names its
    reports table's labels here."""
    templates: list[tuple[str, str]] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """(present, absent) prompt pairs with {finding} and {anatomy} placeholders (>= 5 recommended)."""
    finding_prompts: dict[str, tuple[str, str]] = Field(default_factory=dict)
    """Finding -> its own (present, absent) prompts, used instead of every template for that finding
    (e.g. the wording of the data set's reports)."""
    lesion_term: str = "a lesion"
    """{finding} in the anatomy-wise lesion-presence prompts."""


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN with one class."""
    from scipy.stats import rankdata

    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


METRICS = ("auroc", "balanced_accuracy", "weighted_f1", "sensitivity", "specificity", "precision")
"""Per finding (anatomy), then macro-averaged: CA-GCL and fVLM report AUROC, balanced accuracy
and weighted F1; sensitivity, specificity and precision complete the confusion matrix."""


def classification_metrics(margin: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Binary metrics of logit margins (> 0: "present" wins) against 0/1 labels with both classes.

    AUROC ranks the margins themselves: a softmax probability rounds to 1.0 in float32 once
    scale x cosine margin passes ~17, which would tie sharpened models' scores and lower their
    AUROC with unchanged rankings. The thresholded metrics use margin > 0 (probability > 0.5).
    Weighted F1 is the F1 of each class weighted by its support (scikit-learn's "weighted")."""
    y = labels.astype(bool)
    pred = margin > 0
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    fp, tn = int((pred & ~y).sum()), int((~pred & ~y).sum())
    sensitivity = tp / (tp + fn)
    specificity = tn / (tn + fp)
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1_pos = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if tn + fn + fp else 0.0
    return {
        "auroc": auroc(margin, labels),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "weighted_f1": (f1_pos * (tp + fn) + f1_neg * (tn + fp)) / len(y),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": precision,
    }


def logit_margins(v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> np.ndarray:
    """(N, D) image embeddings, (D,) prompt embeddings -> scale x (cos(v, present) - cos(v, absent))
    in float64: the log-odds of "present" under the two-prompt softmax, without its saturation."""
    return (scale * (v.double() @ pos.double() - v.double() @ neg.double())).cpu().numpy()


ZeroShotItem = tuple[str, int, str, str, int]
"""(title, anatomy index, anatomy name, finding phrase, label column)."""
TextEmbedder = Callable[[list[str]], torch.Tensor]
"""Texts -> (N, D) L2-normalised text embeddings."""


def _task_rows(
    name: str,
    v: torch.Tensor,
    region: np.ndarray,
    labels: np.ndarray,
    cfg: ZeroShotConfig,
    embed_texts: TextEmbedder,
    scale: float,
    items: list[ZeroShotItem],
) -> list[dict[str, Any]]:
    """items: (title, anatomy index, anatomy name, finding phrase, label column) -> one row per
    template with every metric (METRICS) macro-averaged over the items that have both classes."""
    if not items:
        return []
    rows = []
    prompts = [
        t.format(finding=phrase, anatomy=anat)
        for title, _, anat, phrase, _ in items
        for pair in cfg.templates
        for t in cfg.finding_prompts.get(title, pair)
    ]
    emb = embed_texts(prompts).reshape(len(items), len(cfg.templates), 2, -1)
    for t, _ in enumerate(cfg.templates):
        per = []
        for k, (title, j, _, _, col) in enumerate(items):
            ok = region[:, j] & (labels[:, col] >= 0)
            y = labels[ok, col].astype(int)
            if ok.sum() < 2 or y.min() == y.max():
                continue
            margin = logit_margins(v[torch.as_tensor(ok, device=v.device), j], emb[k, t, 0], emb[k, t, 1], scale)
            per.append({"item": title, **classification_metrics(margin, y), "n": int(ok.sum())})
        if per:
            rows.append(
                {
                    "task": name,
                    "template": t,
                    **{m: float(np.mean([p[m] for p in per])) for m in METRICS},
                    "items": per,
                }
            )
    return rows


def evaluate(
    v: torch.Tensor,
    region: np.ndarray,
    finding_labels: np.ndarray,
    abnormal: np.ndarray,
    text_emb: torch.Tensor,
    text_anatomy: np.ndarray,
    anatomies: list[str],
    embed_texts: TextEmbedder,
    scale: float,
    cfg: ZeroShotConfig,
    step: int,
) -> Evaluation:
    """v (S, A, D) anatomy embeddings of the evaluation scans; region (S, A) bool; finding_labels
    (S, F) and abnormal (S, A) in {-1, 0, 1}; text_emb (T, D) the embeddings of their reports'
    anatomy texts with text_anatomy (T,) the anatomy index of each; embed_texts(list[str]) -> (N, D)."""
    index = {a: j for j, a in enumerate(anatomies)}
    findings = [(f, a) for f, a in cfg.findings.items() if a in index]
    finding_items: list[ZeroShotItem] = [(f, index[a], a, f.replace("_", " "), c) for c, (f, a) in enumerate(findings)]
    anatomy_items: list[ZeroShotItem] = [
        (f"{a} (any finding)", j, a, cfg.lesion_term, j) for j, a in enumerate(anatomies)
    ]
    rows = _task_rows("finding", v, region, finding_labels, cfg, embed_texts, scale, finding_items)
    rows += _task_rows("anatomy", v, region, abnormal, cfg, embed_texts, scale, anatomy_items)

    metrics: dict[str, float] = {}
    for task in ("finding", "anatomy"):
        mine = [r for r in rows if r["task"] == task]
        for m in METRICS:
            vals = [r[m] for r in mine]
            metrics[f"zs_{task}_{m}_mean"] = float(np.mean(vals)) if vals else float("nan")
            metrics[f"zs_{task}_{m}_std"] = float(np.std(vals)) if vals else float("nan")
    sims = cross_anatomy_similarity(text_emb, text_anatomy)
    metrics["text_cos_mean"] = float(sims.mean()) if len(sims) else float("nan")
    metrics["text_cos_std"] = float(sims.std()) if len(sims) else float("nan")

    report = {
        "step": step,
        "scans": len(region),
        "metrics": metrics,
        "templates": [list(t) for t in cfg.templates],
        "per_template": rows,
    }
    files = {
        "zero_shot.json": json.dumps(report, indent=1).encode(),
        "zero_shot.md": markdown_table(rows, metrics, step).encode(),
        "text_similarity.png": similarity_histogram(sims, step),
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
    for task in ("finding", "anatomy"):
        cells = [f"{metrics[f'zs_{task}_{m}_mean']:.3f} ± {metrics[f'zs_{task}_{m}_std']:.3f}" for m in METRICS]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Text embeddings of different anatomies: cosine similarity "
        f"mean {metrics['text_cos_mean']:.3f}, std {metrics['text_cos_std']:.3f}",
        "",
    ]
    return "\n".join(lines)


def similarity_histogram(sims: np.ndarray, step: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.hist(sims, bins=50, range=(-1, 1), color="tab:blue")
    ax.set_xlabel("cosine similarity, texts of different anatomies")
    ax.set_ylabel("pairs")
    ax.set_title(f"text embedding collapse at step {step} (mean {sims.mean() if len(sims) else float('nan'):.2f})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
