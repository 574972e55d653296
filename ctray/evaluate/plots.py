"""The report's figures, each a PNG and the numbers it draws (which go to figures.json, so that a
figure can be redrawn or checked without reading pixels). matplotlib with the Agg backend: no
display is needed on a cluster node."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctray.evaluate.zeroshot import TASKS, ItemScores


@dataclass(frozen=True)
class Figure:
    name: str
    """File stem: <name>.png in the report folder, the figure's key in figures.json."""
    title: str
    png: bytes
    data: dict[str, Any] = field(default_factory=dict)
    """Every number drawn, JSON-able."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def similarity_histogram(sims: np.ndarray, title: str) -> Figure:
    """Cosine similarities of texts of different anatomies (CA-GCL Fig. 1): mass near 1 is collapse."""
    counts, edges = np.histogram(sims, bins=50, range=(-1, 1))
    mean = float(sims.mean()) if len(sims) else float("nan")
    fig, ax = _pyplot().subplots(figsize=(5, 3.2), dpi=100)
    ax.stairs(counts, edges, fill=True, color="tab:blue")
    ax.set_xlabel("cosine similarity, texts of different anatomies")
    ax.set_ylabel("pairs")
    ax.set_title(f"{title} (mean {mean:.2f})")
    data = {
        "bin_edges": edges.tolist(),
        "counts": counts.tolist(),
        "pairs": len(sims),
        "mean": mean,
        "std": float(sims.std()) if len(sims) else float("nan"),
    }
    return Figure("text_similarity", title, _png(fig), data)


def roc_curves(items: list[ItemScores]) -> Figure:
    """Zero-shot ROC curve of each scorable item, one panel per task. A curve ranks the margin
    averaged over the templates (a prompt ensemble): one curve per item instead of one per
    template; the tables report the per-template mean and std."""
    from sklearn.metrics import roc_auc_score, roc_curve

    tasks = [t for t in TASKS if any(it.task == t and it.scorable for it in items)]
    fig, axes = _pyplot().subplots(1, len(tasks), figsize=(5 * len(tasks), 4.6), dpi=100, squeeze=False)
    data: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks, strict=True):
        data[task] = {}
        for it in (it for it in items if it.task == task and it.scorable):
            margin = it.margins.mean(0)
            fpr, tpr, _ = roc_curve(it.labels, margin)
            auc = float(roc_auc_score(it.labels, margin))
            ax.plot(fpr, tpr, lw=1.2, label=f"{it.item} ({auc:.2f}, n={len(it.labels)})")
            data[task][it.item] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auroc": auc, "n": len(it.labels)}
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"zero-shot, {task}-wise", aspect="equal")
        ax.legend(fontsize=7, loc="lower right")
    return Figure("roc", "Zero-shot ROC curves (prompt-ensemble margin)", _png(fig), data)


def tsne_map(x: np.ndarray, groups: list[str], seed: int) -> Figure:
    """2-D t-SNE (cosine) of embeddings coloured by group (CA-GCL Fig. 4: anatomy embeddings
    should form one cluster per anatomy). x (n >= 3, D)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, len(x) - 1))
    # Exact gradients on a few hundred points cost less than Barnes-Hut's tree and OpenMP threads
    # (several times less on a busy machine); Barnes-Hut beyond, where exact grows as n^2.
    method = "exact" if len(x) <= 300 else "barnes_hut"
    tsne = TSNE(2, perplexity=perplexity, metric="cosine", init="pca", method=method, random_state=seed)
    xy = tsne.fit_transform(x)
    fig, ax = _pyplot().subplots(figsize=(5.5, 5), dpi=100)
    names = sorted(set(groups))
    g = np.asarray(groups)
    for name in names:
        ax.scatter(*xy[g == name].T, s=8, label=name)
    ax.set(xticks=[], yticks=[], title=f"t-SNE of anatomy embeddings ({len(x)} points)")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    data = {
        "x": xy[:, 0].tolist(),
        "y": xy[:, 1].tolist(),
        "group": list(groups),
        "perplexity": perplexity,
        "method": method,
    }
    return Figure("anatomy_tsne", "t-SNE of anatomy embeddings, coloured by anatomy", _png(fig), data)


def label_efficiency(fractions: list[float], curves: dict[str, list[float]], metric: str) -> Figure:
    """Probe score (macro over labels) against the labelled fraction of the training folds."""
    fig, ax = _pyplot().subplots(figsize=(5, 3.6), dpi=100)
    for label, values in curves.items():
        ax.plot(fractions, values, marker="o", label=label)
    ax.set(xscale="log", xlabel="labelled fraction of each training fold", ylabel=f"{metric} (macro, CV)")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.legend(fontsize=7)
    data = {"fractions": list(fractions), "metric": metric, "curves": curves}
    return Figure("label_efficiency", f"Probe {metric} vs labelled fraction", _png(fig), data)
