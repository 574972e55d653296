"""Retrieval by cosine similarity, under three named protocols, each returning one value per query
so that the report's confidence intervals can resample the queries' groups
(ctray.evaluate.bootstrap.mean_intervals):

- leave-group-out precision@k (`precision_at_k`): every query against the rest of the evaluation
  set, its own group (the patient's other scans) left out.
- CT-FM's (Fig. 5; `gallery_retrieval`): test queries against a gallery of training scans; precision,
  hit rate (a match in the top k) and average precision at k. The paper names AP and HR without
  formulas; ctray's AP@k is the mean of precision@i over the ranks i <= k that hold a match (0
  without one), the usual content-based-retrieval definition.
- CT-CLIP's volume-to-volume retrieval (`label_overlap_at_k`, its scripts/volume_to_volume_new.py):
  every scan queries the scans with at least one positive finding; a retrieved scan scores the
  overlap of the two label sets (both positive / positive in either), averaged over the top k, k in
  (1, 5, 10, 50). Two differences, on purpose: the query's own group is left out (CT-CLIP's gallery
  holds the query itself, which then scores 1 at k = 1), and each k is averaged on its own (the
  script's running list also holds the smaller k's values).

Text-to-scan recall@k (`text_to_scan_ranks`) is CLIP-style retrieval: a report text retrieves its
own scan's embedding of the same anatomy. Ties keep gallery order (a stable sort), so results do not
depend on the platform; queries go in chunks, so that query x gallery similarities are never held at
once."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 1024


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def capped_k(k: int, q_groups: np.ndarray, g_groups: np.ndarray) -> int:
    """k capped to the smallest gallery any query sees once its own group is left out (0: none)."""
    if not len(q_groups):
        return 0
    size = max(int(q_groups.max()), int(g_groups.max(initial=-1))) + 1
    return min(k, len(g_groups) - int(np.bincount(g_groups, minlength=size)[q_groups].max()))


def ranked(
    q_x: np.ndarray, q_groups: np.ndarray, g_x: np.ndarray, g_groups: np.ndarray, k: int, chunk: int = CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per chunk of queries: (their indices, (c, k) indices of their k most cosine-similar gallery
    rows, (c, G) bool: the gallery rows they may retrieve, i.e. not of their own group). k must be
    at most capped_k(...)."""
    unit_g = _unit(g_x)
    unit_q = _unit(q_x)
    for q in np.array_split(np.arange(len(q_x)), max(1, -(-len(q_x) // chunk))):
        sim = unit_q[q] @ unit_g.T
        allowed = q_groups[q][:, None] != g_groups[None, :]
        sim[~allowed] = -np.inf
        yield q, np.argsort(-sim, axis=1, kind="stable")[:, :k], allowed


def _class_hits(
    q_x: np.ndarray,
    q_class: np.ndarray,
    q_groups: np.ndarray,
    g_x: np.ndarray,
    g_class: np.ndarray,
    g_groups: np.ndarray,
    k: int,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """((n, k) bool: the query's i-th match shares its class, (n,) the share of its allowed gallery
    in its class, what a random ranking scores)."""
    hits, chance = np.zeros((len(q_x), k), bool), np.zeros(len(q_x))
    for q, top, allowed in ranked(q_x, q_groups, g_x, g_groups, k, chunk):
        same = g_class[None, :] == q_class[q][:, None]
        hits[q] = np.take_along_axis(same, top, axis=1)
        chance[q] = (same & allowed).sum(1) / allowed.sum(1)
    return hits, chance


def precision_at_k(
    x: np.ndarray, classes: np.ndarray, k: int, queries: np.ndarray, groups: np.ndarray, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-group-out: per query row (bool mask over x (n, D)), the fraction of its k most similar
    rows of x that share its class, and the fraction of its gallery that does (chance). A query's
    gallery is x less its own group (groups (n,) ints). k is capped to the smallest gallery; empty
    arrays without queries or gallery."""
    q = np.flatnonzero(queries)
    k = capped_k(k, groups[q], groups)
    if k < 1:
        return np.zeros(0), np.zeros(0)
    hits, chance = _class_hits(x[q], classes[q], groups[q], x, classes, groups, k, chunk)
    return hits.mean(1), chance


def gallery_retrieval(
    q_x: np.ndarray,
    q_class: np.ndarray,
    q_groups: np.ndarray,
    g_x: np.ndarray,
    g_class: np.ndarray,
    g_groups: np.ndarray,
    k: int,
    chunk: int = CHUNK,
) -> dict[str, np.ndarray]:
    """CT-FM's protocol: queries (q_x (n, D), their class and group) against a separate gallery;
    a gallery row matches a query of its class, and rows of the query's group are left out (a
    patient in both sets would otherwise find itself). -> per query: "p" precision@k, "ap" average
    precision@k, "hr" hit rate@k, "chance" the share of its gallery in its class. Empty arrays
    when k caps to 0."""
    k = capped_k(k, q_groups, g_groups)
    if k < 1:
        return {m: np.zeros(0) for m in ("p", "ap", "hr", "chance")}
    hits, chance = _class_hits(q_x, q_class, q_groups, g_x, g_class, g_groups, k, chunk)
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    matched = hits.sum(1)
    ap = np.divide((precision_at_i * hits).sum(1), matched, out=np.zeros(len(hits)), where=matched > 0)
    return {"p": hits.mean(1), "ap": ap, "hr": hits.any(1).astype(np.float64), "chance": chance}


def label_overlap_at_k(
    x: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT-CLIP's protocol over x (n, D) with finding labels (n, F) in {-1, 0, 1} (-1 unknown, left
    out of both counts): the gallery is the rows with a positive finding, the queries every row with
    a known label. -> (query row indices, per query the mean label overlap of its top k, and of its
    whole allowed gallery: chance). The overlap of two rows is |both positive| / |positive in
    either|, over the findings known in both; a pair with neither positive scores 0, as in CT-CLIP."""
    known, pos = (labels >= 0).astype(np.float64), (labels == 1).astype(np.float64)
    q = np.flatnonzero(known.any(1))
    g = np.flatnonzero(pos.any(1))
    k = capped_k(k, groups[q], groups[g])
    if k < 1:
        return q[:0], np.zeros(0), np.zeros(0)
    overlap, chance = np.zeros(len(q)), np.zeros(len(q))
    for rows, top, allowed in ranked(x[q], groups[q], x[g], groups[g], k, chunk):
        qi = q[rows]
        both = pos[qi] @ pos[g].T
        either = pos[qi] @ known[g].T + known[qi] @ pos[g].T - both
        ratio = np.divide(both, either, out=np.zeros_like(both), where=either > 0)
        overlap[rows] = np.take_along_axis(ratio, top, axis=1).mean(1)
        chance[rows] = (ratio * allowed).sum(1) / allowed.sum(1)
    return q, overlap, chance


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
    match its report as well as its own); anatomies without text are left out. The texts of an
    anatomy are those of the scans np.flatnonzero(region[:, j] & present[:, j]), in that order."""
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
