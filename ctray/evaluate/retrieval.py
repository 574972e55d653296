"""Retrieval by cosine similarity: scan-to-scan precision@k by label, and text-to-scan recall@k
(a report text retrieves its own scan's embedding of the same anatomy, as CLIP-style retrieval
is scored). Ties keep gallery order (a stable sort), so results do not depend on the platform."""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def precision_at_k(x: np.ndarray, classes: np.ndarray, k: int, queries: np.ndarray, chunk: int = 1024) -> float:
    """Mean over the query rows (bool mask) of the fraction of their k most cosine-similar other
    rows of x (n, D) that share their class; k capped to n - 1. NaN without queries. Queries go in
    chunks, so that n x n similarities are never held at once."""
    n = len(x)
    k = min(k, n - 1)
    if k < 1 or not queries.any():
        return float("nan")
    unit = _unit(x)
    hits = []
    for q in np.array_split(np.flatnonzero(queries), -(-int(queries.sum()) // chunk)):
        sim = unit[q] @ unit.T
        sim[np.arange(len(q)), q] = -np.inf  # a scan does not retrieve itself
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        hits.append((classes[top] == classes[q][:, None]).mean(1))
    return float(np.concatenate(hits).mean())


def truth_ranks(queries: np.ndarray, gallery: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(m, D) queries, (g, D) gallery, (m,) index of each query's match -> (m,) its 0-based rank
    by cosine similarity (ties: lower gallery index first)."""
    sim = _unit(queries) @ _unit(gallery).T
    own = sim[np.arange(len(truth)), truth][:, None]
    before = (sim > own) | ((sim == own) & (np.arange(sim.shape[1])[None, :] < truth[:, None]))
    return before.sum(1)


def text_to_scan_ranks(
    text: np.ndarray, image: np.ndarray, present: np.ndarray, region: np.ndarray, anatomies: list[str]
) -> dict[str, np.ndarray]:
    """text, image (S, A, D) text and anatomy embeddings; present, region (S, A) -> anatomy -> the
    rank of each of its report texts' own scan among the scans showing that anatomy; anatomies
    without text are left out."""
    out = {}
    for j, a in enumerate(anatomies):
        gallery = np.flatnonzero(region[:, j])
        asks = present[gallery, j]
        if asks.any():
            out[a] = truth_ranks(text[gallery[asks], j], image[gallery, j], np.flatnonzero(asks))
    return out
