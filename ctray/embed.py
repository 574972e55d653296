"""`ctray embed EXPORT SHARDS OUT`: a trained encoder over a shards set, as Ray Data batch inference.

Shards -> read_parquet -> an autoscaling pool of actors (one GPU each where the cluster has GPUs),
each holding the export (ctray.export.load_encoder) and running the recipe's sampler (the run's
preprocessing, with a seed per scan: a scan embeds alike in any batch, on any actor) and
`Task.embed` -> the driver, which writes one Parquet part per input shard once all its scans are
in (OUT/part-<shard>-<sha>.parquet, atomically, named by the shard and the start of its file's
sha256 in its commit record). Re-running skips shards whose part exists, so a stopped job loses at
most the shards in flight, and deletes the parts of shards no longer in the shard set: a purge or a
rewrite replaces a shard by another, and the old part would otherwise keep the purged scans and
count the others twice. OUT/embed.json describes the columns (the contract of `ctray eval`):

- scan_id, group (the shards' patient/study key: scans of one group belong on one side of a split;
  embed.json's "groups" says how ingest formed them), embedding (D floats), finding_labels (F int8;
  -1 unknown; names in embed.json);
- anatomy objectives: anatomy_embedding (A x D), region (A bool), abnormal (A int8);
  with a text tower also text_embedding (A x D, the report's anatomy texts) and present (A bool);
- CT-FM: the scan as a grid of patches (ctray.objectives.ctfm.sliding), the embedding their mean;
  with --patches also patch_embedding (M x D) and patch_origin (M x 3, each patch's first voxel),
  for semantic search within scans (M differs by scan).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctray.config import StorageConfig
from ctray.console import quiet_dataset, verbose
from ctray.errors import ConfigError
from ctray.ingest.derived import part_name, record_derived
from ctray.redact import redact_text

if TYPE_CHECKING:
    from ctray.ingest.shardset import ShardSet

log = logging.getLogger(__name__)

ANATOMY_COLUMNS = ("region", "present", "abnormal")
"""Sampler outputs copied to the embeddings as they are (per anatomy)."""


@dataclass(frozen=True)
class EmbedResult:
    out: str
    """The embeddings folder."""
    scans: int
    """Scans embedded by this call (not counting shards done before)."""
    parts: int
    """Parts written by this call."""


def finding_names(meta: dict[str, Any], shard_set: ShardSet) -> dict[str, str]:
    """Finding label -> anatomy ("" when none): the recipe's zero-shot findings where it has them,
    else every label name the shards carry."""
    from ctray.storage import arrow_filesystem

    findings = meta["recipe"].get("zero_shot", {}).get("findings")
    if findings:
        return dict(findings)
    afs, _ = arrow_filesystem(shard_set.uri, shard_set.storage)
    names: set[str] = set()
    for path in sorted(shard_set.shard_paths()):
        for labels in pq.read_table(path, columns=["labels"], filesystem=afs).column("labels").to_pylist():
            names.update(lab["name"] for lab in labels or [])
    return dict.fromkeys(sorted(names), "")


class EmbedActor:
    """map_batches actor: shard rows (pyarrow) -> the embedding columns (numpy), plus each row's shard."""

    def __init__(self, export: str, storage: dict[str, Any], findings: list[str], patches: bool, seed: int):
        import torch

        from ctray.export import load_encoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = load_encoder(export, StorageConfig.model_validate(storage), device)
        self.sampler = self.encoder.sampler()
        self.findings, self.patches, self.seed = findings, patches, seed

    def rng(self, scan_id: str) -> np.random.Generator:
        from ctray.data.pipeline import stream_seed

        return np.random.default_rng(stream_seed(self.seed, "embed", zlib.crc32(scan_id.encode())))

    def embed(self, rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Sampler outputs of rows of one shape -> the output columns of those rows."""
        batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        out = {k: v.cpu().numpy() for k, v in self.encoder.embed(batch).items()}
        if self.patches and "patch_origin" in batch:
            out["patch_origin"] = batch["patch_origin"]
        if not self.patches:
            out.pop("patch_embedding", None)
        if "anatomy_embedding" not in out or not self.encoder.has_text:
            out.pop("text_embedding", None)
        for key in ANATOMY_COLUMNS:  # the task's (decided on the device: CA-GCL), else the sampler's
            value = out.pop(key, batch.get(key))
            if value is not None and "anatomy_embedding" in out and (key != "present" or "text_embedding" in out):
                out[key] = value.astype(np.int8 if key == "abnormal" else bool)
        if "anatomy_embedding" in out and "abnormal" not in out:  # a sampler without labels (TotalFM stage 1)
            out["abnormal"] = np.full(out["anatomy_embedding"].shape[:2], -1, dtype=np.int8)
        return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in out.items()}

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        ids = table.column("scan_id").to_pylist()
        rows = [self.sampler(table.slice(i, 1), self.rng(ids[i])) for i in range(len(ids))]
        if all(r[k].shape == rows[0][k].shape for r in rows for k in r):
            out = self.embed(rows)
        else:  # rows of their own shape (CT-FM's patch grid): one by one, ragged columns as objects
            per = [self.embed([r]) for r in rows]
            out = {k: _rows([p[k] for p in per]) for k in per[0]}
        labels = np.full((len(ids), len(self.findings)), -1, dtype=np.int8)
        column = {f: j for j, f in enumerate(self.findings)}
        for i, row_labels in enumerate(table.column("labels").to_pylist()):
            for lab in row_labels or []:
                if lab["name"] in column:
                    labels[i, column[lab["name"]]] = lab["value"]
        return {
            "scan_id": np.asarray(ids, dtype=object),
            "group": np.asarray(table.column("group").to_pylist(), dtype=object),
            "path": np.asarray(table.column("path").to_pylist(), dtype=object),
            "finding_labels": labels,
            **out,
        }


def _rows(arrays: list[np.ndarray]) -> np.ndarray:
    """(1, ...) arrays -> (N, ...), or an object array of the rows when their shapes differ."""
    if all(a.shape == arrays[0].shape for a in arrays):
        return np.concatenate(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a[0]
    return out


def _column(values: np.ndarray) -> pa.Array:
    """A (N, ...) array as nested fixed-size lists (N, ) of its trailing shape."""
    flat = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def part_table(rows: list[dict[str, Any]], columns: list[str]) -> pa.Table:
    data = {
        "scan_id": pa.array([r["scan_id"] for r in rows], pa.string()),
        "group": pa.array([r["group"] for r in rows], pa.string()),
    }
    for c in columns:
        values = [np.asarray(r[c]) for r in rows]
        if all(v.shape == values[0].shape for v in values):
            data[c] = _column(np.stack(values))
        else:  # one list per scan (CT-FM's patch grid), of fixed-size lists
            data[c] = pa.array([v.tolist() for v in values], pa.list_(_column(values[0][:1]).type))
    return pa.table(data)


def run_embed(
    export: str,
    shards: str,
    out: str,
    storage: StorageConfig | None = None,
    batch_scans: int = 4,
    patches: bool = False,
    actors: int | None = None,
    seed: int = 0,
) -> EmbedResult:
    """Embed every committed scan of `shards` with `export` into `out` (see module docstring)."""
    from ctray.export import export_uri, load_sampler
    from ctray.ingest.shardset import ShardSet
    from ctray.storage import arrow_filesystem, filesystem, publish_bytes, resolve_uri

    storage = storage or StorageConfig()
    export, shards, out = export_uri(export, storage), resolve_uri(shards), resolve_uri(out)
    meta, sampler = load_sampler(export, storage)
    shard_set = ShardSet.open(shards, storage)
    items = shard_set.scans()
    rows_of: dict[str, int] = defaultdict(int)
    for item in items:
        rows_of[item.path] += 1
    _, sroot = arrow_filesystem(shards, storage)
    parts = {posixpath.join(sroot, s.path): part_name(s.shard, s.sha256) for s in shard_set.shards if s.stats.rows}
    ofs, oroot = filesystem(out, storage)
    done = {p for p in rows_of if ofs.exists(posixpath.join(oroot, parts[p]))}
    pending = sorted(set(rows_of) - done)
    findings = finding_names(meta, shard_set)
    description = {
        "objective": meta["objective"],
        "export": export,
        "export_step": meta["step"],
        "shards": redact_text(shards),
        "anatomies": meta.get("anatomies"),
        "findings": list(findings),
        "finding_anatomies": {f: a for f, a in findings.items() if a},
        "seed": seed,
        "scans": len(items),
        "groups": shard_set.ingest.groups.describe(shard_set.ingest.privacy.pseudonymize_ids),
    }
    settings = {"findings": list(findings), "patches": patches, "seed": seed}
    _same_export(description, ofs, posixpath.join(oroot, "embed.json"), out, storage)
    _drop_stale_parts(ofs, oroot, set(parts.values()), storage)
    publish_bytes(json.dumps(description, indent=1).encode(), ofs, posixpath.join(oroot, "embed.json"), storage)
    result = EmbedResult(out, 0, 0)
    if pending:
        log.info(
            "embed: %d scans of %d shards (%d done before) with the %s export at step %d -> %s",
            sum(rows_of[p] for p in pending), len(pending), len(done), meta["objective"], meta["step"], out,
        )  # fmt: skip
        pool = (batch_scans, actors)
        result = _embed_pending(export, shards, out, storage, pending, rows_of, parts, sampler.columns, settings, pool)
    else:
        log.info("embed: every one of %d shards already has its part in %s", len(rows_of), out)
    a_part = posixpath.join(oroot, parts[sorted(rows_of)[0]])
    with ofs.open(a_part, "rb") as f:
        description["dim"] = pq.read_schema(f).field("embedding").type.list_size
    publish_bytes(json.dumps(description, indent=1).encode(), ofs, posixpath.join(oroot, "embed.json"), storage)
    record_derived(shards, storage, "embeddings", out, [s.shard for s in shard_set.shards if s.stats.rows])
    return result


def _same_export(description: dict[str, Any], fs: Any, path: str, out: str, storage: StorageConfig) -> None:
    """Parts already in `out` must come from the same export, seed and findings: resuming into a
    folder of another run's embeddings would mix them."""
    from ctray.storage import read_bytes

    if not fs.exists(path):
        return
    before = json.loads(read_bytes(fs, path, storage))
    keys = ("export", "export_step", "seed", "findings")
    changed = [k for k in keys if before.get(k) != description[k]]
    if changed:
        raise ConfigError(f"{out} holds embeddings made with another {', '.join(changed)}: use a new folder")


def _drop_stale_parts(fs: Any, root: str, current: set[str], storage: StorageConfig) -> None:
    """Delete the parts under `root` of shards the shard set no longer holds (purged, rewritten)."""
    from ctray.storage import list_files

    stale = [
        p
        for p in list_files(fs, root, storage, ".parquet")
        if posixpath.basename(p).startswith("part-") and posixpath.basename(p) not in current
    ]
    for path in stale:
        fs.rm(path)
    if stale:
        log.info("embed: removed %d part(s) of shards no longer in the shard set (purged or rewritten)", len(stale))


def _embed_pending(
    export: str,
    shards: str,
    out: str,
    storage: StorageConfig,
    pending: list[str],
    rows_of: dict[str, int],
    parts: dict[str, str],
    sampler_columns: tuple[str, ...],
    settings: dict[str, Any],
    pool: tuple[int, int | None],
) -> EmbedResult:
    """The pending shards through the actor pool (pool: scans per batch, most actors)."""
    import ray

    from ctray.storage import arrow_filesystem, filesystem, publish_bytes

    gpus = int(ray.cluster_resources().get("GPU", 0))
    batch_scans, actors = pool
    max_actors = actors or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // 4)
    afs, _ = arrow_filesystem(shards, storage)
    columns = sorted({*sampler_columns, "scan_id", "group", "labels", "path"})
    rows = ray.data.read_parquet(pending, filesystem=afs, include_paths=True).select_columns(columns)
    ds = rows.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"export": export, "storage": storage.model_dump(mode="json"), **settings},
        batch_size=batch_scans,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )
    quiet_dataset(ds, verbose())
    ofs, oroot = filesystem(out, storage)
    return _write_parts(
        ds,
        rows_of,
        parts,
        pending,
        out,
        lambda name, data: publish_bytes(data, ofs, posixpath.join(oroot, name), storage),
    )


def _write_parts(
    ds: Any,
    rows_of: dict[str, int],
    parts_of: dict[str, str],
    pending: list[str],
    out: str,
    write: Callable[[str, bytes], None],
) -> EmbedResult:
    """Gather each shard's rows from the stream; publish its part once complete."""
    buffered: dict[str, list[dict[str, Any]]] = defaultdict(list)
    total = sum(rows_of[p] for p in pending)
    t0, last_log, scans, parts = time.time(), 0.0, 0, 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        columns = [c for c in batch if c not in ("scan_id", "group", "path")]
        for i, path in enumerate(batch["path"]):
            ids = {"scan_id": str(batch["scan_id"][i]), "group": str(batch["group"][i])}
            buffered[path].append({**ids, **{c: batch[c][i] for c in columns}})
            if len(buffered[path]) == rows_of[path]:
                rows = sorted(buffered.pop(path), key=lambda r: r["scan_id"])
                sink = pa.BufferOutputStream()
                pq.write_table(part_table(rows, columns), sink, compression="zstd")
                write(parts_of[path], sink.getvalue().to_pybytes())
                parts += 1
            scans += 1
        now = time.time()
        if now - last_log > 10 or scans == total:
            rate = scans / max(now - t0, 1e-9)
            log.info(
                "embed: [%d/%d scans, %d/%d parts, %.2f scans/s, ETA %.0f s]",
                scans, total, parts, len(pending), rate, (total - scans) / rate if rate else 0,
            )  # fmt: skip
            last_log = now
    if buffered:
        raise RuntimeError(f"embed: {len(buffered)} shard(s) came back incomplete: {sorted(buffered)[:3]}")
    log.info("embed done: %d scans in %d parts in %.0f s; embeddings %s", scans, parts, time.time() - t0, out)
    return EmbedResult(out, scans, parts)
