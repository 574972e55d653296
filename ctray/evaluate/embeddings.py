"""Read an embeddings folder written by `ctray embed` into arrays, checking what the evaluations
rely on (one line naming the problem otherwise).

The folder: embed.json {"objective", "export", "dim", "anatomies", "findings", "finding_anatomies",
"scans"} and part-*.parquet with one row per scan: scan_id, group (the patient or study the scan
belongs to, from ingest's `groups`; parts written before it: each scan its own group),
embedding (D), finding_labels (F; -1 unknown); anatomy objectives add anatomy_embedding (A x D),
region (A), abnormal (A); CLIP-type ones also text_embedding (A x D) and present (A).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.storage import filesystem, list_files, read_bytes, read_many

log = logging.getLogger("ctray")


@dataclass(frozen=True)
class Embeddings:
    """One evaluation set, scans sorted by id (the same order whatever the parts' split)."""

    uri: str
    objective: str
    export: str
    shards: str
    """The shard set embedded (embed.json; "" when not recorded)."""
    export_step: int
    """The step of the export's weights (embed.json; -1 when not recorded)."""
    findings: list[str]
    """Finding label names, the columns of finding_labels."""
    finding_anatomies: dict[str, str]
    anatomies: list[str]
    """Anatomy names, the columns of the per-anatomy arrays ([] without them)."""
    scan_ids: list[str]
    groups: list[str]
    """The group (patient or study) of each scan: folds, retrieval galleries and bootstrap
    resamples keep a group whole, so near-identical scans of one patient never score each other."""
    embedding: np.ndarray
    """(S, D) float32 scan-level embeddings."""
    finding_labels: np.ndarray
    """(S, F) int8 in {-1, 0, 1}."""
    anatomy_embedding: np.ndarray | None
    """(S, A, D) L2-normalised (zeros outside region), or None for scan-level objectives."""
    region: np.ndarray | None
    """(S, A) bool: the anatomy is in the scan."""
    abnormal: np.ndarray | None
    """(S, A) int8 in {-1, 0, 1}."""
    text_embedding: np.ndarray | None
    """(S, A, D) L2-normalised report-text embeddings (zeros where absent); None unless CLIP-type."""
    present: np.ndarray | None
    """(S, A) bool: the anatomy has report text."""

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    @cached_property
    def embedded(self) -> np.ndarray:
        """(S,) bool: the scan has an embedding. An anatomy objective's scan embedding is the mean of
        its anatomies' in the image; a scan with none has a zero vector, which scores nothing."""
        return np.linalg.norm(self.embedding, axis=1) > 0

    @cached_property
    def group_index(self) -> np.ndarray:
        """(S,) int: each scan's group as an index 0..G-1 (groups in sorted order)."""
        return np.unique(np.asarray(self.groups, dtype=object), return_inverse=True)[1].astype(np.int64)


def _dense(arr: Any, name: str, uri: str) -> np.ndarray:
    """A (nested) list array whose lists at each level have one length -> numpy (S, L1, L2, ...).
    `ctray embed` writes fixed-size lists; variable-size ones of equal lengths are read too."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.asarray(arr.value_lengths().fill_null(-1))
        if len(lengths) and (lengths.min() != lengths.max() or lengths.min() < 0):
            raise ConfigError(f"{uri}: column {name} has lists of {lengths.min()} to {lengths.max()} values (or nulls)")
        width = int(lengths[0]) if len(lengths) else 0
    else:
        return np.asarray(arr.to_numpy(zero_copy_only=False))
    inner = _dense(arr.flatten(), name, uri)
    return inner.reshape(len(arr), width, *inner.shape[1:])


def _column(table: Any, name: str, uri: str, dtype: type) -> np.ndarray:
    if name not in table.column_names:
        raise ConfigError(f"{uri}: the part files have no column {name}")
    return _dense(table.column(name).combine_chunks(), name, uri).astype(dtype)


def load_embeddings(uri: str, storage: StorageConfig) -> Embeddings:
    """The embeddings folder at `uri` -> Embeddings; ConfigError naming the problem for a folder
    without embed.json or parts, or with embeddings of another dimension than embed.json says."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = filesystem(uri, storage)
    try:
        meta = json.loads(read_bytes(fs, posixpath.join(root, "embed.json"), storage))
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no embed.json (not an embeddings folder written by `ctray embed`)") from None
    parts = sorted(p for p in list_files(fs, root, storage, ".parquet") if posixpath.basename(p).startswith("part-"))
    if not parts:
        raise ConfigError(f"{uri}: no part-*.parquet files")
    try:
        table = pa.concat_tables(pq.read_table(io.BytesIO(b)) for b in read_many(fs, parts, storage).values())
    except pa.ArrowInvalid as e:  # parts of different schemas: written by different exports or versions
        raise ConfigError(f"{uri}: the part files do not share one schema ({str(e).splitlines()[0]})") from None
    table = table.sort_by("scan_id")
    if table.num_rows == 0:
        raise ConfigError(f"{uri}: no scans in the part files")
    anatomies = list(meta.get("anatomies") or [])
    findings = list(meta.get("findings") or [])
    scan_ids = [str(s) for s in table.column("scan_id").to_pylist()]
    duplicates = len(scan_ids) - len(set(scan_ids))
    if duplicates:
        # Parts of a shard set that changed since (a purge or rewrite renamed shards): counted twice,
        # a scan would score against itself and weigh double. The ids are not named: they may be the
        # scans' own names where ingest did not pseudonymise them.
        raise ConfigError(
            f"{uri}: {duplicates} scan id(s) appear in more than one part (parts of shards that were purged or "
            "rewritten since?): run `ctray embed` into this folder again, which drops the parts of shards no "
            "longer in the shard set"
        )
    names = set(table.column_names)
    has = {c: c in names and bool(anatomies) for c in ("anatomy_embedding", "text_embedding")}
    emb = Embeddings(
        uri=uri,
        objective=str(meta.get("objective", "?")),
        export=str(meta.get("export", "")),
        shards=str(meta.get("shards", "")),
        export_step=int(meta.get("export_step", -1)),
        findings=findings,
        finding_anatomies=dict(meta.get("finding_anatomies") or {}),
        anatomies=anatomies if has["anatomy_embedding"] else [],
        scan_ids=scan_ids,
        groups=_groups(table, scan_ids, uri),
        embedding=_column(table, "embedding", uri, np.float32),
        finding_labels=_column(table, "finding_labels", uri, np.int8),
        anatomy_embedding=_column(table, "anatomy_embedding", uri, np.float32) if has["anatomy_embedding"] else None,
        region=_column(table, "region", uri, bool) if has["anatomy_embedding"] else None,
        abnormal=_column(table, "abnormal", uri, np.int8) if has["anatomy_embedding"] else None,
        text_embedding=_column(table, "text_embedding", uri, np.float32) if has["text_embedding"] else None,
        present=_column(table, "present", uri, bool) if has["text_embedding"] else None,
    )
    _check_shapes(emb)
    _check_dims(emb, int(meta.get("dim", emb.dim)))
    log.info("eval: %d scans of %s embeddings (%d dims) from %s", len(emb.scan_ids), emb.objective, emb.dim, uri)
    return emb


def _groups(table: Any, scan_ids: list[str], uri: str) -> list[str]:
    """The parts' group column; parts without one (written before groups existed): each scan its
    own group, said once, since scans of one patient may then meet across folds."""
    if "group" in table.column_names:
        return [str(g) for g in table.column("group").to_pylist()]
    log.warning("eval: %s has no group column (embedded before groups): each scan is its own group", uri)
    return list(scan_ids)


def _check_shapes(emb: Embeddings) -> None:
    """Per-anatomy columns hold one entry per anatomy of embed.json; finding_labels one per finding."""
    if emb.finding_labels.shape[1] != len(emb.findings):
        raise ConfigError(
            f"{emb.uri}: finding_labels has {emb.finding_labels.shape[1]} columns, embed.json names "
            f"{len(emb.findings)} findings"
        )
    for name in ("anatomy_embedding", "region", "abnormal", "text_embedding", "present"):
        a = getattr(emb, name)
        if a is not None and a.shape[1] != len(emb.anatomies):
            raise ConfigError(
                f"{emb.uri}: {name} has {a.shape[1]} anatomies per scan, embed.json names {len(emb.anatomies)}"
            )


def _check_dims(emb: Embeddings, dim: int) -> None:
    for name in ("embedding", "anatomy_embedding", "text_embedding"):
        a = getattr(emb, name)
        if a is not None and a.shape[-1] != dim:
            raise ConfigError(f"{emb.uri}: {name} has {a.shape[-1]} dimensions, embed.json says {dim}")


def require_labels(emb: Embeddings) -> None:
    """ConfigError when no scan has a known finding label: probes, kNN and retrieval by label (and
    zero-shot) have nothing to score."""
    if not (emb.finding_labels >= 0).any():
        what = "no findings in embed.json" if not emb.findings else "every finding_labels entry is -1"
        raise ConfigError(
            f"{emb.uri}: no finding labels ({what}); the probe, kNN, retrieval and zero-shot metrics "
            "need scans with labels (ingest their reports' labels)"
        )
