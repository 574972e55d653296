"""Where the thresholded zero-shot metrics (balanced accuracy, weighted F1, sensitivity,
specificity, precision) cut the logit margin. AUROC needs no threshold and compares across papers
as it is; the thresholded figures compare only under the same protocol:

- "validation" (default): each finding's threshold at the ROC corner of a validation split drawn
  by group from the evaluation scans (seeded), every metric on the other groups: honest.
- "margin": margin > 0 (the two-prompt softmax's 0.5), nothing tuned: honest, often low.
- "test_roc_corner": the ROC corner of the test scans themselves, as fVLM's and CT-CLIP's released
  evaluation code does: optimistic, but what their tables report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from ctray.evaluate.zeroshot import ItemScores, roc_corner_threshold

Protocol = Literal["validation", "margin", "test_roc_corner"]


def _corners(item: ItemScores, rows: np.ndarray) -> np.ndarray | None:
    """Each template's ROC-corner threshold over the item's scans `rows` (None: one class there)."""
    labels = item.labels[rows]
    if len(np.unique(labels)) < 2:
        return None
    return np.array([roc_corner_threshold(m[rows], labels) for m in item.margins])


def apply_protocol(
    items: list[ItemScores], protocol: Protocol, group_index: np.ndarray, fraction: float, seed: int
) -> tuple[list[ItemScores], str]:
    """The items to score under `protocol` (with their thresholds; "validation": restricted to the
    test groups) and the report's line saying how the thresholds were chosen."""
    if protocol == "margin":
        return items, "Thresholded metrics at logit margin > 0 (probability > 0.5); no threshold tuned."
    if protocol == "test_roc_corner":
        every = [replace(it, thresholds=_corners(it, np.arange(len(it.labels)))) for it in items]
        return every, (
            "Thresholds at the ROC corner of the test scans themselves (fVLM's and CT-CLIP's protocol): "
            "OPTIMISTIC; compare the thresholded figures with those papers' tables only."
        )
    groups = int(group_index.max()) + 1
    held = np.random.default_rng(seed).permutation(groups)[: max(1, round(fraction * groups))]
    validation = np.isin(group_index, held)
    out, untuned = [], 0
    for it in items:
        on_validation = validation[it.scans]
        thresholds = _corners(it, np.flatnonzero(on_validation))
        untuned += thresholds is None
        test = ~on_validation
        out.append(
            replace(
                it, scans=it.scans[test], labels=it.labels[test], margins=it.margins[:, test], thresholds=thresholds
            )
        )
    line = (
        f"Thresholds at the ROC corner of a validation split ({len(held)} of {groups} groups, seed {seed}); every "
        f"zero-shot metric on the other {groups - len(held)} groups."
    )
    if untuned:
        line += f" {untuned} item(s) with one class in the validation split keep margin > 0."
    return out, line
