"""The shard set's records: commit records, which of them are live, cleanup, rewriting a shard
without some scans (a changed input, `ctray purge`), the manifest, and `ctray verify`.

A commit record is live unless a later record names it in `supersedes`. Rewriting a shard writes
the new shard and its record (superseding the old one) before removing the old files, so a crash
at any point leaves either the old or the new record live, never both, and never a scan twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import pyarrow.parquet as pq

import ctray
from ctray.config import StorageConfig
from ctray.errors import ConfigError, first_line
from ctray.ingest.config import IngestConfig, OutputConfig
from ctray.ingest.lease import Lease
from ctray.ingest.schema import SCHEMA_VERSION, SHARD_SCHEMA
from ctray.ingest.shards import file_sha256, open_shard, publish_record
from ctray.ingest.shardset import (
    COMMITS_DIR,
    SHARDS_DIR,
    CommitRecord,
    CommittedScan,
    Failed,
    Quarantined,
    ShardSet,
    Skipped,
    Written,
)
from ctray.storage import filesystem, join, list_files, publish_file, read_many, remove

log = logging.getLogger(__name__)


@dataclass
class Records:
    live: list[CommitRecord]
    """Commit records in commit order, none superseded."""
    superseded: list[CommitRecord]
    """Commit records a live one supersedes (their shards are no longer part of the set)."""
    unreadable: list[str] = field(default_factory=list)
    """Names of the records that are not JSON (cut short, overwritten): their shards cannot be
    accounted for, so nothing may clean them away (`clean` refuses)."""

    @property
    def committed(self) -> dict[str, tuple[CommittedScan, CommitRecord]]:
        """scan id -> (its entry, its live record)."""
        return {s.scan_id: (s, r) for r in self.live for s in r.scans}

    def holding(self, scan_ids: Iterable[str]) -> list[tuple[CommitRecord, set[str]]]:
        """(live record, which of `scan_ids` it holds) for each record holding any of them."""
        out: dict[str, tuple[CommitRecord, set[str]]] = {}
        committed = self.committed
        for sid in scan_ids:
            if sid in committed:
                record = committed[sid][1]
                out.setdefault(record.shard, (record, set()))[1].add(sid)
        return list(out.values())


def read_records(uri: str, storage: StorageConfig) -> Records:
    """The commit records under `uri`, live and superseded. One that is not JSON (cut short) is
    left out with a warning and listed as unreadable; one that is JSON but not a commit record is a
    ConfigError."""
    fs, root = filesystem(uri, storage)
    paths = list_files(fs, join(root, COMMITS_DIR), storage, suffix=".json")
    records, unreadable = [], []
    for path, blob in sorted(read_many(fs, paths, storage).items()):
        name = posixpath.basename(path)
        try:
            d = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("ignoring an unreadable commit record %s", name)
            unreadable.append(name)
            continue
        try:
            records.append(CommitRecord.from_json(d))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            why = f"no {e} key" if isinstance(e, KeyError) else f"{type(e).__name__}: {first_line(e)}"
            raise ConfigError(
                f"{join(uri, COMMITS_DIR, name)} is not a commit record of this ctray ({why}); ingest into a new"
                " output.uri"
            ) from None
    records.sort(key=lambda r: r.committed_at)
    gone = {name for r in records for name in r.supersedes}
    return Records([r for r in records if r.shard not in gone], [r for r in records if r.shard in gone], unreadable)


def unreadable_advice(uri: str, names: list[str]) -> str:
    """One line on unreadable commit records: what they hold back and what to do, never a command
    that deletes what cannot be accounted for."""
    shards = ", ".join(f"{SHARDS_DIR}/{posixpath.splitext(n)[0]}.parquet" for n in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return (
        f"{len(names)} commit record(s) in {join(uri, COMMITS_DIR)} are not readable JSON ({', '.join(names[:3])}"
        f"{more}), so the shards they name ({shards}{more}) cannot be told from leftovers: restore the records "
        "from a copy (a versioned bucket, a backup); or delete each such record together with its shard, "
        "whose scans the next `ctray ingest` then writes again"
    )


def clean(uri: str, storage: StorageConfig, records: Records, lease: Lease) -> None:
    """Remove superseded records and their shards, then shard files that no live record names (a
    writer died between publishing and committing). Only while `lease` is ours, checked before each
    removal: an ingest that took the lease over may just have published a shard that `records`,
    read before, would make a leftover. A ConfigError, before anything is removed, while a record is
    unreadable: its shard would look like a leftover and go, scans and all."""
    if records.unreadable:
        raise ConfigError(f"ingest stopped: {unreadable_advice(uri, records.unreadable)}")
    fs, root = filesystem(uri, storage)
    for r in records.superseded:
        lease.ensure(f"removing superseded shard {r.shard}")
        if r.path:
            remove(fs, join(root, r.path), storage)
        remove(fs, join(root, r.record_path), storage)
    named = {r.path for r in records.live if r.path}
    for path in list_files(fs, join(root, SHARDS_DIR), storage):
        rel = posixpath.relpath(path, root)
        if rel not in named:
            lease.ensure(f"removing uncommitted leftover {rel}")
            log.info("removing uncommitted leftover %s", rel)
            remove(fs, path, storage)


def rewrite_without(
    uri: str, storage: StorageConfig, record: CommitRecord, drop: set[str], why: str, lease: Lease
) -> CommitRecord:
    """Replace a committed shard by one without the scans in `drop` (row groups copied one by one,
    so memory stays at one scan); returns the new live record. The old files are removed last.
    The new record keeps the old one's figures (stats) but for rows and bytes. Only while `lease` is
    ours, checked before starting and before committing (copying a shard takes a while)."""
    lease.ensure(f"rewriting shard {record.shard}")
    fs, root = filesystem(uri, storage)
    keep = [s for s in record.scans if s.scan_id not in drop]
    name = "part-" + hashlib.sha1((record.shard + "\0" + "\0".join(sorted(drop))).encode()).hexdigest()[:16]
    started = time.time()
    sha = None
    size = 0
    with tempfile.TemporaryDirectory(prefix="ctray-rewrite-") as tmp:
        if keep:
            assert record.path is not None  # a record listing scans names their file
            local = os.path.join(tmp, name + ".parquet")
            with fs.open(join(root, record.path), "rb") as f:
                src = pq.ParquetFile(f)
                # At the default codecs: the shard set does not record those it was written with.
                defaults = OutputConfig.model_fields
                level, codec = defaults["compression_level"].default, defaults["bulk_codec"].default
                with open_shard(local, level, codec) as out:
                    for i in range(src.num_row_groups):
                        table = src.read_row_group(i)
                        if table.column("scan_id")[0].as_py() not in drop:
                            out.write_table(table.cast(SHARD_SCHEMA))
            sha, size = file_sha256(local).hexdigest(), os.path.getsize(local)
            publish_file(local, fs, join(root, SHARDS_DIR, name + ".parquet"), storage)
    new = CommitRecord.new(
        shard=name,
        fingerprint=record.fingerprint,
        scans=keep,
        quarantine=(),
        stats=replace(record.stats, rows=len(keep), bytes=size),
        sha256=sha,
        started=started,
        supersedes=[record.shard],
        rewritten=why,
    )
    lease.ensure(f"committing shard {name} (shard {record.shard} without {len(drop)} scan(s))")
    publish_record(new, fs, root, storage)
    if record.path:
        remove(fs, join(root, record.path), storage)
    remove(fs, join(root, record.record_path), storage)
    log.info("rewrote shard %s without %d scan(s) (%s) -> %s", record.shard, len(drop), why, name)
    return new


def build_manifest(
    uri: str,
    storage: StorageConfig,
    config: IngestConfig,
    fingerprint: str,
    records: Records,
    quarantined: Iterable[Quarantined],
    skipped: Iterable[Skipped],
    failed: Iterable[Failed],
    purged: list[str],
    ungrouped: int = 0,
) -> ShardSet:
    """The shard set at `uri` as its manifest describes it (publish its to_json()): every input
    accounted for: written (from the live records), quarantined (this run's and earlier ones' for
    inputs still not written), skipped (this run's discovery) and failed; `ungrouped`: the scans
    this run's discovery placed in no group."""
    committed = records.committed
    gone = set(purged)
    earlier = [q.entry() for r in records.live + records.superseded for q in r.quarantine]
    latest: dict[str, Quarantined] = {}
    for entry in [*earlier, *quarantined]:
        key = entry.scan_id or entry.input
        if key not in committed and key not in gone:
            latest[key] = entry  # later records win
    shards = [entry for entry in (r.shard_entry() for r in records.live) if entry is not None]
    written = [Written(sid, entry.input, r.shard) for sid, (entry, r) in sorted(committed.items())]
    fallbacks: dict[str, int] = {}
    for r in records.live:
        for parser, n in r.parsers.items():
            if parser.startswith("rules (llm failed"):
                reason = parser.removeprefix("rules (llm failed: ").rstrip(")")
                fallbacks[reason] = fallbacks.get(reason, 0) + n
    return ShardSet(
        uri=uri,
        storage=storage,
        schema_version=SCHEMA_VERSION,
        ctray_version=ctray.__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        fingerprint=fingerprint,
        ingest=config,
        shards=tuple(shards),
        written=tuple(written),
        quarantine=tuple(sorted(latest.values(), key=lambda q: q.input)),
        skipped=tuple(sorted(skipped, key=lambda s: s.input)),
        failed=tuple(failed),
        purged=tuple(sorted(purged)),
        llm_fallbacks=fallbacks,
        ungrouped=ungrouped,
    )


def _manifest_problems(uri: str, storage: StorageConfig, committed: set[str]) -> list[str]:
    """The manifest's problems: unreadable, or not listing the committed scans (ingest rebuilds it
    from the records, deleting nothing they account for)."""
    try:
        shard_set = ShardSet.open(uri, storage)
    except ConfigError as e:
        return [str(e)]
    if {w.scan_id for w in shard_set.written} != committed:
        return [f"{shard_set.manifest_uri} does not list the committed scans (re-run `ctray ingest` to rebuild it)"]
    return []


def verify(uri: str, storage: StorageConfig) -> list[str]:
    """Problems of a shard set, one line each (empty: every committed shard is whole): each live
    record's shard exists with its recorded size and sha256, its rows are the recorded scans, no
    scan is in two shards, and the manifest lists what the records hold."""
    fs, root = filesystem(uri, storage)
    records = read_records(uri, storage)
    problems = []
    seen: dict[str, str] = {}
    for i, r in enumerate(records.live, 1):
        for s in r.scans:
            if s.scan_id in seen:
                problems.append(f"scan {s.scan_id} is in two shards: {seen[s.scan_id]} and {r.shard}")
            seen[s.scan_id] = r.shard
        if not r.path:
            continue
        path = join(root, r.path)
        try:
            digest = hashlib.sha256()
            size = 0
            with fs.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            problems.append(f"{r.path}: committed but missing")
            continue
        if size != r.bytes or digest.hexdigest() != r.sha256:
            problems.append(
                f"{r.path}: {size} bytes, sha256 {digest.hexdigest()[:12]}..; the commit record says"
                f" {r.bytes} bytes, {str(r.sha256)[:12]}.."
            )
            continue
        with fs.open(path, "rb") as f:
            ids = pq.read_table(f, columns=["scan_id"]).column("scan_id").to_pylist()
        if ids != [s.scan_id for s in r.scans]:
            problems.append(f"{r.path}: its rows are not the scans its commit record lists")
        log.info("[%d/%d] %s ok", i, len(records.live), r.path)
    if records.unreadable:
        problems.append(unreadable_advice(uri, records.unreadable))
    else:  # the manifest cannot be checked against records that cannot be read
        problems += _manifest_problems(uri, storage, set(seen))
    for p in problems:
        log.error("%s", p)
    log.info(
        "verify %s: %d committed shard(s), %s",
        uri,
        len(records.live),
        f"{len(problems)} problem(s)" if problems else "all whole",
    )
    return problems
