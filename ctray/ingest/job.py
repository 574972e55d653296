"""`ctray ingest`: discover inputs, skip what is committed, run shard writers on Ray Data, write
manifest.json.

Layout of the output (local folder or s3:// prefix):
    shards/part-<hash>.parquet     one row per scan (ctray.data.schema)
    _commits/part-<hash>.json      written after its shard: the shard counts only once this exists
    _cache/llm/..                  LLM answers by report hash (parser: llm)
    manifest.json                  config, schema version, counts, per-shard stats, quarantine
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass

from ctray.config import to_yaml
from ctray.data.schema import SCHEMA_VERSION
from ctray.errors import ConfigError, CtrayError, StorageError
from ctray.ingest.config import IngestConfig
from ctray.ingest.reports import ReportTable, parse_report_table
from ctray.ingest.shards import COMMITS_DIR, SHARDS_DIR, ShardWriter, preprocess_fingerprint, shard_name
from ctray.runtime import ensure_ray
from ctray.storage import filesystem, is_remote, join, list_files, publish_bytes, read_bytes, resolve_uri, with_retries

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST = "manifest.json"


@dataclass
class IngestResult:
    manifest_uri: str
    shards: int
    scans: int
    quarantined: int


def _scan_id(path: str) -> str | None:
    base = posixpath.basename(path)
    for suffix in NIFTI_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return None


def discover_scans(cfg: IngestConfig) -> tuple[list[dict], list[dict]]:
    """Scan references (NIfTI files and DICOM series folders) and quarantine entries for duplicates."""
    fs, root = filesystem(cfg.input.scans, cfg.storage)
    if not with_retries(lambda: fs.exists(root), f"list {cfg.input.scans}", cfg.storage):
        raise ConfigError(f"input.scans {cfg.input.scans} does not exist")
    files = list_files(fs, root, cfg.storage)
    to_uri = fs.unstrip_protocol if is_remote(cfg.input.scans) else (lambda p: p)
    scans: dict[str, dict] = {}
    dicom: dict[str, list[str]] = {}
    dupes: list[dict] = []

    def add(ref: dict) -> None:
        sid = ref["scan_id"]
        if sid in scans:
            dupes.append({"scan_id": sid, "input": ref["uri"], "reason": f"{ref['uri']}: duplicate scan id {sid!r} (also {scans[sid]['uri']})"})
        else:
            scans[sid] = ref

    for path in files:
        sid = _scan_id(path)
        if sid is not None:
            add({"scan_id": sid, "uri": to_uri(path), "kind": "nifti"})
        elif path.lower().endswith(".dcm"):
            dicom.setdefault(posixpath.dirname(path), []).append(to_uri(path))
    for folder, series in sorted(dicom.items()):
        add({"scan_id": posixpath.basename(folder), "uri": to_uri(folder), "kind": "dicom", "files": sorted(series)})
    return [scans[k] for k in sorted(scans)], dupes


def discover_masks(cfg: IngestConfig) -> dict[str, str]:
    if not cfg.input.masks:
        return {}
    fs, root = filesystem(cfg.input.masks, cfg.storage)
    remote = is_remote(cfg.input.masks)
    out = {}
    for path in list_files(fs, root, cfg.storage):
        sid = _scan_id(path)
        if sid is not None:
            out[sid] = fs.unstrip_protocol(path) if remote else path
    return out


def load_reports(cfg: IngestConfig) -> ReportTable | None:
    if not cfg.input.reports:
        return None
    fs, path = filesystem(cfg.input.reports, cfg.storage)
    try:
        raw = read_bytes(fs, path, cfg.storage)
    except FileNotFoundError as e:
        raise ConfigError(f"input.reports {cfg.input.reports} does not exist") from e
    try:
        return parse_report_table(raw, posixpath.basename(path), cfg.input.report_id_column, cfg.input.report_text_column)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def read_commits(cfg: IngestConfig) -> list[dict]:
    fs, root = filesystem(cfg.output.uri, cfg.storage)
    records = []
    for path in list_files(fs, join(root, COMMITS_DIR), cfg.storage, suffix=".json"):
        records.append(json.loads(read_bytes(fs, path, cfg.storage)))
    return sorted(records, key=lambda r: r["committed_at"])


def _clean_orphans(cfg: IngestConfig, records: list[dict]) -> None:
    """Remove shard files without a commit record (a writer died between the two) and local temp files."""
    fs, root = filesystem(cfg.output.uri, cfg.storage)
    committed = {r["path"] for r in records if r["path"]}
    for path in list_files(fs, join(root, SHARDS_DIR), cfg.storage):
        rel = posixpath.relpath(path, root)
        if rel not in committed:
            log.info("removing uncommitted leftover %s", rel)
            with_retries(lambda p=path: fs.rm_file(p), f"remove {rel}", cfg.storage)


def build_manifest(cfg: IngestConfig, records: list[dict], run_quarantine: list[dict], seen: int) -> dict:
    committed = {sid for r in records for sid in r["scan_ids"]}
    latest: dict[str, dict] = {}
    for entry in [q for r in records for q in r["quarantine"]] + run_quarantine:
        if entry["scan_id"] not in committed:
            latest[entry["scan_id"] or entry["input"]] = entry  # later records win
    shards = [
        {"path": r["path"], "shard": r["shard"], "scans": len(r["scan_ids"]), "stats": r["stats"]}
        for r in records if r["path"]
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": preprocess_fingerprint(cfg),
        "config": cfg.model_dump(mode="json"),
        "counts": {
            "inputs_seen": seen,
            "scans": len(committed),
            "shards": len(shards),
            "quarantined": len(latest),
            "bytes": sum(s["stats"]["bytes"] for s in shards),
        },
        "shards": shards,
        "quarantine": sorted(latest.values(), key=lambda q: q["input"]),
    }


def run_ingest(cfg: IngestConfig) -> IngestResult:
    started = time.time()
    cfg = cfg.model_copy(deep=True)
    for section, key in ((cfg.input, "scans"), (cfg.input, "reports"), (cfg.input, "masks"), (cfg.output, "uri")):
        if getattr(section, key):
            setattr(section, key, resolve_uri(getattr(section, key)))
    if cfg.input.segment:
        from ctray.ingest.segment import check_weights

        check_weights(cfg.input.segment_fast)
    fs_out, root = filesystem(cfg.output.uri, cfg.storage)
    out_uri = cfg.output.uri

    records = read_commits(cfg)
    fingerprint = preprocess_fingerprint(cfg)
    stale = {r["fingerprint"] for r in records} - {fingerprint}
    if stale:
        raise ConfigError(
            f"{out_uri} already holds shards made with other preprocessing settings; "
            "write to a new output.uri (or delete the old shards)"
        )
    _clean_orphans(cfg, records)
    committed = {sid for r in records for sid in r["scan_ids"]}

    scans, quarantine = discover_scans(cfg)
    masks = discover_masks(cfg)
    table = load_reports(cfg)
    if table is not None:
        quarantine += [{"scan_id": "", "input": where, "reason": f"{where}: {why}"} for where, why in table.problems]
    todo = []
    for scan in scans:
        if scan["scan_id"] in committed:
            continue
        scan["mask_uri"] = masks.get(scan["scan_id"])
        if table is not None:
            rep = table.reports.get(scan["scan_id"])
            scan["report"] = None if rep is None else {"text": rep.text, "problem": rep.problem, "labels": rep.labels}
        todo.append(scan)
    per = cfg.output.scans_per_shard
    items = [
        {"shard": shard_name([s["scan_id"] for s in group]), "scans": json.dumps(group)}
        for group in (todo[i : i + per] for i in range(0, len(todo), per))
    ]
    log.info(
        "ingest: %d scans found, %d already committed, %d to write in %d shards -> %s",
        len(scans), len(committed & {s["scan_id"] for s in scans}), len(todo), len(items), out_uri,
    )

    try:
        if items:
            _run_writers(cfg, items, len(todo))
    finally:
        # Whatever happened, the manifest describes every committed shard (if storage is up).
        try:
            records = read_commits(cfg)
            manifest = build_manifest(cfg, records, quarantine, len(scans) + len(quarantine))
            publish_bytes(json.dumps(manifest, indent=1).encode(), fs_out, join(root, MANIFEST), cfg.storage)
            publish_bytes(to_yaml(cfg).encode(), fs_out, join(root, "ingest-config.yaml"), cfg.storage)
        except StorageError as e:
            log.error("manifest not written (%s); committed shards are intact and the next run rebuilds it", e)
            raise
    counts = manifest["counts"]
    log.info(
        "ingest done in %.1fs: %d scans in %d shards, %d quarantined; manifest %s",
        time.time() - started, counts["scans"], counts["shards"], counts["quarantined"], posixpath.join(out_uri, MANIFEST),
    )
    return IngestResult(posixpath.join(out_uri, MANIFEST), counts["shards"], counts["scans"], counts["quarantined"])


def _run_writers(cfg: IngestConfig, items: list[dict], n_scans: int) -> None:
    import ray

    ensure_ray(cfg.ray)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.input.segment and gpus > 0
    workers = max(1, min(len(items), cfg.concurrency or (gpus if use_gpu else cpus)))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        ShardWriter,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json")},
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    done_shards = done_scans = 0
    t0 = time.time()
    try:
        for out in ds.iter_rows():
            record = json.loads(out["record"])
            done_shards += 1
            done_scans += len(record["scan_ids"]) + len(record["quarantine"])
            log.info(
                "[%d/%d shards, %d/%d scans, %.2f scans/s] %s: %d written, %d quarantined",
                done_shards, len(items), done_scans, n_scans, done_scans / max(time.time() - t0, 1e-9),
                record["shard"], len(record["scan_ids"]), len(record["quarantine"]),
            )
    except Exception as e:
        cause = _root_cause(e)
        if isinstance(cause, CtrayError):
            raise type(cause)(str(cause)) from e
        raise


def _root_cause(e: BaseException) -> BaseException:
    """Ray wraps a task's exception (RayTaskError, UserCodeException); find the ctray error inside."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CtrayError):
            return e
        e = e.__cause__ or e.__context__
    return e
