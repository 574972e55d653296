"""`ctray purge`: take scans out of a shard set once it is written.

Purging a scan (a patient withdrew consent, a scan should not have been exported) rewrites its
shard without it and re-commits it, removes its LLM cache entry, its quarantine mentions and its
id map entry, records its id and content hash in purged.json (so no later ingest takes it again,
under its id or, a copy of its file, under another) and rewrites the manifest. The content hash is
read from the commit records: keyed where ids are pseudonymised (ctray.ingest.privacy), so
purged.json links no pseudonym to the PACS files either. It holds the output's lease like an
ingest, so it never races one, and checks that the lease is still its own before each write
(Lease.ensure).

It then reaches what was made of the shards it rewrote, as recorded under `_derived/`
(ctray.ingest.derived): embeddings folders lose the scans' rows, evaluation reports are deleted or
kept as the user says (it stops before changing anything while that is unsaid), the runs whose
tokenizer saw the scans' reports are named, and the tokenizers kept in the shard set are dropped.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.ingest.config import IngestConfig
from ctray.ingest.derived import (
    SHARED_TOKENIZERS,
    Derived,
    drop_per_shard,
    forget_derived,
    part_name,
    read_derived,
    record_derived,
    shard_of_part,
)
from ctray.ingest.job import PURGED, read_purged, resolve
from ctray.ingest.lease import Lease
from ctray.ingest.llm import CACHE_DIR, cache_path
from ctray.ingest.privacy import Names, check_key, read_id_map, update_id_map
from ctray.ingest.records import Records, build_manifest, read_records, rewrite_without, unreadable_advice
from ctray.ingest.shards import publish_record
from ctray.ingest.shardset import MANIFEST, CommitRecord, ShardSet
from ctray.storage import filesystem, join, list_files, publish_bytes, read_bytes, remove

log = logging.getLogger(__name__)


def _stored_ids(cfg: IngestConfig, ids: list[str], committed: set[str]) -> list[str]:
    """Ids as the shards store them: with pseudonymised ids, an original id is turned into its
    pseudonym (the key must be in the environment)."""
    if not cfg.privacy.pseudonymize_ids:
        return ids
    names = None
    out = []
    for sid in ids:
        if sid in committed:
            out.append(sid)
            continue
        if names is None:
            names = Names(cfg)
            check_key(names, cfg.output.uri, cfg.storage, committed=True)  # another key would find nothing
        out.append(names.scan_id(sid, ""))
    return out


def purge(uri: str, storage: StorageConfig, scan_ids: list[str], evaluations: str | None = None) -> dict:
    """Remove scans from a shard set everywhere ctray keeps them, and from what was made of them
    (ctray.ingest.derived); returns what was done. `evaluations` ("delete" or "keep"): what to do
    with evaluation reports computed with the scans; None refuses while there are any."""
    shard_set = ShardSet.open(uri, storage)
    cfg = resolve(shard_set.ingest)  # a copy
    cfg.output.uri, cfg.storage = uri, storage
    fs, root = filesystem(uri, storage)
    with Lease(uri, cfg.lease, storage, what="purge") as lease:
        records = read_records(uri, storage)
        if records.unreadable:  # the scan may sit in a shard whose record cannot be read
            raise ConfigError(f"purge stopped: {unreadable_advice(uri, records.unreadable)}")
        committed = records.committed
        ids = _stored_ids(cfg, scan_ids, set(committed))
        known = set(committed) | {q.scan_id for q in shard_set.quarantine}
        unknown = [given for sid, given in zip(ids, scan_ids, strict=False) if sid not in known]
        if unknown:
            raise ConfigError(
                f"{uri}: no scan with id {', '.join(map(repr, unknown))} (see manifest.json 'written' and 'quarantine')"
            )
        rewrites = records.holding(ids)
        derived = _reached(uri, storage, {record.shard for record, _ in rewrites}, evaluations)
        cache_keys = []
        new_of: dict[str, CommitRecord] = {}
        for record, drop in rewrites:
            assert record.path is not None  # a record holding scans names their file
            with fs.open(join(root, record.path), "rb") as f:
                table = pq.read_table(f, columns=["scan_id", "report_cache_key"])
            scan_ids = table.column("scan_id").to_pylist()
            keys = table.column("report_cache_key").to_pylist()
            cache_keys += [k for s, k in zip(scan_ids, keys, strict=False) if s in drop and k]
            new_of[record.shard] = rewrite_without(uri, storage, record, drop, "purged", lease)
        if rewrites:  # the organ volumes cut from the rewritten shards hold the purged scans' pixels
            lease.ensure("dropping the rewritten shards' organ caches")
            drop_per_shard(uri, storage, {record.shard for record, _ in rewrites})
        shared_tokenizers = list_files(fs, join(root, SHARED_TOKENIZERS), storage, ".json") if rewrites else []
        if shared_tokenizers:  # trained on the purged reports too; a later run trains anew without them
            lease.ensure("dropping the shard set's tokenizers")
        for path in shared_tokenizers:
            remove(fs, path, storage)
        if cache_keys:
            lease.ensure("removing LLM cache entries")
        for key in cache_keys:
            remove(fs, cache_path(join(root, CACHE_DIR), key), storage)
        # A scan purged from the quarantine only was never hashed in a record: its id alone is kept.
        hashes = [committed[sid][0].content_hash for sid in ids if sid in committed]
        purged = read_purged(uri, storage).adding(ids, hashes)
        lease.ensure(f"writing {PURGED}")
        publish_bytes(purged.to_json().encode(), fs, join(root, PURGED), storage)
        gone = set(ids)
        records = read_records(uri, storage)
        live = []
        for r in records.live:  # earlier quarantine entries name the scan too
            if any(q.scan_id in gone for q in r.quarantine):
                r = replace(r, quarantine=tuple(q for q in r.quarantine if q.scan_id not in gone))
                lease.ensure(f"rewriting commit record {r.shard}")
                publish_record(r, fs, root, storage)
            live.append(r)
        records = Records(live, records.superseded, records.unreadable)
        shard_set = build_manifest(
            uri,
            storage,
            shard_set.ingest,
            shard_set.fingerprint,
            records,
            shard_set.quarantine,
            shard_set.skipped,
            [f for f in shard_set.failed if not gone & set(f.scan_ids)],
            list(purged.scan_ids),
            shard_set.ungrouped,
        )
        lease.ensure("writing the manifest")
        publish_bytes(shard_set.to_json().encode(), fs, join(root, MANIFEST), storage)
        id_map = _drop_from_id_map(cfg, gone)
        reached = _purge_derived(uri, storage, derived, new_of, gone, evaluations)
    log.info(
        "purged %d scan(s) from %s: %d shard(s) rewritten, %d LLM cache entr(ies) removed%s; manifest %s",
        len(ids),
        uri,
        len(rewrites),
        len(cache_keys),
        f", id map {id_map} updated" if id_map else "",
        shard_set.manifest_uri,
    )
    return {"scan_ids": ids, "shards_rewritten": len(rewrites), "cache_entries": len(cache_keys), **reached}


def _reached(uri: str, storage: StorageConfig, shards: set[str], evaluations: str | None) -> list[Derived]:
    """The recorded outputs made from `shards` (ctray.ingest.derived) that still exist. Evaluation
    reports among them stop the purge, before it changes anything, unless `evaluations` says what
    to do with them: their figures were computed with the scans, though they name none."""
    out = []
    for d in read_derived(uri, storage):
        if not shards & set(d.shards):
            continue
        fs, root = filesystem(d.uri, storage)
        if not fs.exists(root):
            forget_derived(uri, storage, d)
            continue
        out.append(d)
    reports = [d.uri for d in out if d.kind == "evaluation"]
    if reports and evaluations is None:
        raise ConfigError(
            f"purge stopped: {len(reports)} evaluation report(s) were computed with these scans "
            f"({', '.join(reports)}): "
            "pass --evaluations delete to remove them (then embed and eval again) or --evaluations keep to leave them"
        )
    return out


def _purge_derived(
    uri: str,
    storage: StorageConfig,
    derived: list[Derived],
    new_of: dict[str, CommitRecord],
    gone: set[str],
    evaluations: str | None,
) -> dict[str, list[str]]:
    """Embeddings rewritten without the scans, evaluation reports deleted or kept as told, the runs
    whose tokenizer saw them named; returns the URIs of each (embeddings, evaluations, tokenizers)."""
    done: dict[str, list[str]] = {"embeddings": [], "evaluations": [], "tokenizers": []}
    for d in derived:
        if d.kind == "embeddings":
            rows = _purge_embeddings(d.uri, storage, new_of, gone)
            shards = [s for s in d.shards if s not in new_of] + [new_of[s].shard for s in d.shards if s in new_of]
            record_derived(uri, storage, "embeddings", d.uri, shards)
            log.info(
                "purge: %s: %d embedding row(s) removed; the other scans' parts renamed to the new shards", d.uri, rows
            )
            done["embeddings"].append(d.uri)
        elif d.kind == "evaluation":
            if evaluations == "delete":
                fs, root = filesystem(d.uri, storage)
                fs.rm(root, recursive=True)
                forget_derived(uri, storage, d)
                log.info("purge: evaluation report %s deleted (computed with the purged scans)", d.uri)
            else:
                log.warning("purge: evaluation report %s kept as told; its figures include the purged scans", d.uri)
            done["evaluations"].append(d.uri)
        else:
            done["tokenizers"].append(d.uri)
    if done["tokenizers"]:
        log.warning(
            "purge: the tokenizer.json of run(s) %s was trained on reports including the purged scans' (it holds no "
            "word of fewer than its tokenizer_min_patients patients); train a new run to leave them out entirely",
            ", ".join(done["tokenizers"]),
        )
    return done


def _drop_from_id_map(cfg: IngestConfig, ids: set[str]) -> str | None:
    if not cfg.privacy.pseudonymize_ids:
        return None
    if not read_id_map(cfg):
        return None
    return update_id_map(cfg, lambda entries: {k: e for k, e in entries.items() if k not in ids})


def _purge_embeddings(embeddings: str, storage: StorageConfig, new_of: dict[str, CommitRecord], gone: set[str]) -> int:
    """Rewrite the parts of the rewritten shards without the purged scans, each under its new
    shard's part name (a scan embeds alike in any shard: ctray.embed), so that the folder stays
    whole and the next `ctray embed` has nothing to redo; returns the rows removed."""
    fs, root = filesystem(embeddings, storage)
    removed = 0
    for path in list_files(fs, root, storage, ".parquet"):
        old = shard_of_part(path)
        if old not in new_of or not posixpath.basename(path).startswith("part-"):
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        kept = table.filter(pc.invert(pc.is_in(table.column("scan_id"), pa.array(sorted(gone), pa.string()))))
        removed += table.num_rows - kept.num_rows
        new = new_of[old]
        if kept.num_rows and new.sha256:
            sink = pa.BufferOutputStream()
            pq.write_table(kept, sink)
            publish_bytes(sink.getvalue().to_pybytes(), fs, join(root, part_name(new.shard, new.sha256)), storage)
        remove(fs, path, storage)
    meta_path = join(root, "embed.json")
    if removed and fs.exists(meta_path):
        meta = json.loads(read_bytes(fs, meta_path, storage))
        meta["scans"] = meta.get("scans", removed) - removed
        publish_bytes(json.dumps(meta, indent=1).encode(), fs, meta_path, storage)
    return removed
