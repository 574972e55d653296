"""Retrieval by cosine similarity: scan-to-scan precision@k by label, and text-to-scan recall@k
(a report text retrieves its own scan's embedding of the same anatomy, as CLIP-style retrieval
is scored). Ties keep gallery order (a stable sort), so results do not depend on the platform."""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def precision_at_k(
    x: np.ndarray, classes: np.ndarray, k: int, queries: np.ndarray, groups: np.ndarray, chunk: int = 1024
) -> tuple[float, float]:
    """(P@k, its chance level): the mean over the query rows (bool mask) of the fraction of their k
    most cosine-similar rows of x (n, D) that share their class, and of the fraction of their
    gallery that does (what a random ranking scores). A query's gallery leaves out its own group
    (groups (n,) ints): other scans of the same patient would be found by identity, not by the
    finding. k is capped to the smallest gallery; NaN without queries. Queries go in chunks, so that
    n x n similarities are never held at once."""
    q_all = np.flatnonzero(queries)
    sizes = np.bincount(groups)
    k = min(k, len(x) - int(sizes[groups[q_all]].max())) if len(q_all) else 0
    if k < 1:
        return float("nan"), float("nan")
    unit = _unit(x)
    hits, chance = [], []
    for q in np.array_split(q_all, -(-len(q_all) // chunk)):
        sim = unit[q] @ unit.T
        own = groups[q][:, None] == groups[None, :]
        sim[own] = -np.inf  # neither the scan itself nor its group's other scans
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        same = classes[None, :] == classes[q][:, None]
        hits.append(same[np.arange(len(q))[:, None], top].mean(1))
        chance.append((same & ~own).sum(1) / (~own).sum(1))
    return float(np.concatenate(hits).mean()), float(np.concatenate(chance).mean())


def text_to_scan_ranks(
    text: np.ndarray,
    image: np.ndarray,
    present: np.ndarray,
    region: np.ndarray,
    anatomies: list[str],
    groups: np.ndarray,
) -> dict[str, np.ndarray]:
    """text, image (S, A, D) text and anatomy embeddings; present, region (S, A); groups (S,) ints
    -> anatomy -> the rank of each of its report texts' own scan among the scans showing that
    anatomy, the other scans of its group left out (another reconstruction of the same scan would
    match its report as well as its own); anatomies without text are left out."""
    out = {}
    for j, a in enumerate(anatomies):
        gallery = np.flatnonzero(region[:, j])
        asks = np.flatnonzero(present[gallery, j])
        if not len(asks):
            continue
        sim = _unit(text[gallery[asks], j]) @ _unit(image[gallery, j]).T
        others = (groups[gallery[asks]][:, None] == groups[gallery][None, :]) & (
            asks[:, None] != np.arange(len(gallery))
        )
        sim[others] = -np.inf
        own = sim[np.arange(len(asks)), asks][:, None]
        before = (sim > own) | ((sim == own) & (np.arange(len(gallery))[None, :] < asks[:, None]))
        out[a] = before.sum(1)
    return out
