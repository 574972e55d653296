"""`ctray ingest`: take the output's lease, discover every input, skip what is committed and
unchanged, rewrite shards whose inputs changed, run one Ray task per new shard, write the manifest.

Layout of the output (local folder or s3:// / gs:// prefix):
    shards/part-<hash>.parquet     one row per scan (ctray.ingest.schema)
    _commits/part-<hash>.json      written after its shard: the shard counts only once this exists
    _lease.json                    the running ingest's lease (ctray.ingest.lease)
    _lease.json.lock               local folders: locked while the lease changes hands
    _probe/, _cache/llm/           DICOM folder probes and LLM answers, reused by later runs
    purged.json                    scans removed by `ctray purge`, by id and content hash (Purged);
                                   never ingested again, under that id or another
    key-check.json                 the pseudonymisation key's check value (ctray.ingest.privacy)
    manifest.json                  config (redacted), counts, shards, and every input: written,
                                   quarantined (reason), skipped (reason)
The pseudonym map (privacy.pseudonymize_ids) is written outside it (privacy.id_map).

Shard writers are plain Ray tasks asking for 1 CPU, memory for the largest scan `max_voxels` lets
in (IngestConfig.writer_memory) and 1 GPU with `input.segment`: queued
tasks are demand an autoscaling cluster adds nodes for, and a job whose tasks no node type can
run is refused within a minute (ctray.runtime.ensure_schedulable).

A shard whose worker process dies (out of memory, a crash, a lost node) is re-run by Ray
(`task_retries`). When it still dies, one of its scans may be what kills it (a huge or malformed
input), which would cost its shard-mates every run: the shard is split and each of its scans
retried as a one-scan shard of its own. Those that write are committed as usual; a one-scan shard
whose worker still dies is quarantined under its scan's label (the driver's entry, like
discovery's: no commit record holds it). Like every quarantined input it is tried again by the next
run: alone when nothing else is new, quarantined again after its retries; with new scans beside it,
their shard is split once more and they are committed, so no scan is held back for good.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from ctray.config import StorageConfig
from ctray.errors import ConfigError, CtrayError, StorageError
from ctray.ingest.config import IngestConfig
from ctray.ingest.discover import Inventory, attach, discover, discover_masks, load_reports, probe_cache_location
from ctray.ingest.lease import Lease
from ctray.ingest.llm import Secret
from ctray.ingest.privacy import Names, check_key
from ctray.ingest.records import Records, build_manifest, clean, read_records, rewrite_without
from ctray.ingest.shards import preprocess_fingerprint, shard_name, write_shard
from ctray.ingest.shardset import INGEST_CONFIG, MANIFEST, CommitRecord, Quarantined, Skipped
from ctray.redact import redacted
from ctray.runtime import ensure_ray, ensure_schedulable
from ctray.storage import filesystem, join, publish_bytes, read_bytes, resolve_uri

log = logging.getLogger(__name__)

PURGED = "purged.json"


@dataclass
class IngestResult:
    manifest_uri: str
    shards: int
    scans: int
    quarantined: int
    skipped: int = 0


def resolve(cfg: IngestConfig) -> IngestConfig:
    cfg = cfg.model_copy(deep=True)
    for section, key in (
        (cfg.input, "scans"),
        (cfg.input, "reports"),
        (cfg.input, "labels"),
        (cfg.input, "masks"),
        (cfg.output, "uri"),
    ):
        if getattr(section, key):
            setattr(section, key, resolve_uri(getattr(section, key)))
    return cfg


def config_yaml(cfg: IngestConfig) -> str:
    """ingest-config.yaml: the run's config as `ctray ingest` reads it, redacted like the manifest's
    (ctray.redact): it sits beside the shards, readable by everyone who trains on them."""
    return yaml.safe_dump(redacted(cfg.model_dump(mode="json")), sort_keys=False)


@dataclass(frozen=True)
class Purged:
    """purged.json: the scans `ctray purge` removed, which no later ingest writes again."""

    scan_ids: tuple[str, ...] = ()
    """Their ids (pseudonyms with privacy.pseudonymize_ids), sorted: plan() skips these inputs."""
    content_hashes: tuple[str, ...] = ()
    """Their content hashes (the rows' content_hash: keyed with privacy.pseudonymize_ids), sorted:
    the shard writers quarantine an input with one of these, whatever its name (a copy of a purged
    file under another path)."""

    @classmethod
    def from_json(cls, d: list | dict) -> Purged:
        """From purged.json's JSON: an object as to_json writes it, or a list of ids (as ctray wrote
        it before content hashes were recorded)."""
        if isinstance(d, list):
            return cls(tuple(sorted(d)))
        return cls(tuple(sorted(d["scan_ids"])), tuple(sorted(d["content_hashes"])))

    def to_json(self) -> str:
        """purged.json's text (what from_json reads back)."""
        return json.dumps({"scan_ids": list(self.scan_ids), "content_hashes": list(self.content_hashes)})

    def adding(self, scan_ids: Iterable[str], content_hashes: Iterable[str]) -> Purged:
        """This record with `scan_ids` and `content_hashes` added (a purge's)."""
        return Purged(
            tuple(sorted({*self.scan_ids, *scan_ids})), tuple(sorted({*self.content_hashes, *content_hashes}))
        )


def read_purged(uri: str, storage: StorageConfig) -> Purged:
    """The output's purged.json (nothing purged where there is none)."""
    fs, root = filesystem(uri, storage)
    try:
        return Purged.from_json(json.loads(read_bytes(fs, join(root, PURGED), storage)))
    except FileNotFoundError:
        return Purged()


def run_ingest(cfg: IngestConfig) -> IngestResult:
    started = time.time()
    cfg = resolve(cfg)
    names = Names(cfg)  # a missing pseudonymisation key fails here, before anything is written
    api_key = Secret(None)
    if cfg.reports.parser == "llm":
        from ctray.ingest.llm import check_endpoint, read_api_key

        api_key = read_api_key(cfg.reports.llm)
        check_endpoint(cfg.reports.llm, list(cfg.preprocess.anatomies), api_key)
    if cfg.input.segment:
        from ctray.ingest.segment import check_weights

        check_weights(cfg.input.segment_fast)
    fingerprint = preprocess_fingerprint(cfg)
    out_uri = cfg.output.uri
    fs_out, root = filesystem(out_uri, cfg.storage)
    with Lease(out_uri, cfg.lease, cfg.storage) as lease:
        records = read_records(out_uri, cfg.storage)
        check_key(names, out_uri, cfg.storage, committed=bool(records.live))
        stale = {r.fingerprint for r in records.live} - {fingerprint}
        if stale:
            versions = sorted({r.ctray_version for r in records.live})
            raise ConfigError(
                f"{out_uri} already holds shards made with other settings (or ctray {', '.join(versions)}); "
                "write to a new output.uri (or delete the old shards)"
            )
        clean(out_uri, cfg.storage, records, lease)
        records = Records(records.live, [])
        table = load_reports(cfg)  # a table that cannot be read fails before any work starts
        inventory = discover(cfg, names, probe_cache_location(cfg, names))
        if table is not None:
            inventory.quarantined += [
                {"scan_id": "", "input": where, "reason": f"{where}: {why}"} for where, why in table.problems
            ]
        reports = attach(inventory, discover_masks(cfg), table)
        purged = read_purged(out_uri, cfg.storage)
        todo = plan(cfg, inventory, records, set(purged.scan_ids))
        drop_changed(cfg, records, todo, lease)
        killers: list[dict] = []
        try:
            if todo:
                killers = run_writers(cfg, todo, reports, api_key, names.content_key(), purged, lease)
        finally:  # whatever happened, the manifest describes every committed shard (if storage is up)
            try:
                records = read_records(out_uri, cfg.storage)
                manifest = build_manifest(
                    out_uri,
                    cfg.storage,
                    cfg,
                    fingerprint,
                    records,
                    [Quarantined.from_json(q) for q in inventory.quarantined + killers],
                    [Skipped.from_json(s) for s in inventory.skipped],
                    (),  # a shard that kept dying is split, its killer quarantined: none fails whole
                    list(purged.scan_ids),
                    inventory.ungrouped,
                )
                lease.ensure("writing the manifest")
                publish_bytes(manifest.to_json().encode(), fs_out, join(root, MANIFEST), cfg.storage)
                publish_bytes(config_yaml(cfg).encode(), fs_out, join(root, INGEST_CONFIG), cfg.storage)
                id_map = names.write_map()
            except StorageError as e:
                log.error("manifest not written (%s); committed shards are intact and the next run rebuilds it", e)
                raise
    c = manifest.counts
    log.info(
        "ingest done in %.1fs: %d inputs: %d written (%d scans in %d shards), %d quarantined, %d skipped;"
        " manifest %s%s",
        time.time() - started,
        c.inputs,
        c.written,
        c.scans,
        c.shards,
        c.quarantined,
        c.skipped,
        manifest.manifest_uri,
        f"; id map {id_map}" if id_map else "",
    )
    return IngestResult(manifest.manifest_uri, c.shards, c.scans, c.quarantined, c.skipped)


def plan(cfg: IngestConfig, inventory: Inventory, records: Records, purged: set[str]) -> list[dict]:
    """Scans to write: new ones and changed ones (whose old rows drop_changed removes first).
    Unchanged committed scans are skipped. Writes nothing."""
    committed = records.committed
    todo, changed = [], []
    for scan in inventory.scans:
        sid = scan["scan_id"]
        if sid in purged:
            inventory.skipped.append(
                {"input": scan["label"], "reason": f"{scan['label']}: removed by `ctray purge`; not ingested again"}
            )
            continue
        if sid in committed:
            if committed[sid][0].stamp == scan["stamp"]:
                continue
            changed.append(sid)
        todo.append(scan)
    log.info(
        "ingest: %d scans found, %d committed and unchanged, %d changed, %d to write -> %s",
        len(inventory.scans),
        len(inventory.scans) - len(todo),
        len(changed),
        len(todo),
        cfg.output.uri,
    )
    return todo


def drop_changed(cfg: IngestConfig, records: Records, todo: list[dict], lease: Lease) -> None:
    """Rewrite the shards holding committed scans that `todo` writes again (changed inputs) without
    them, before anything is written, so that no scan is ever in two shards."""
    committed = records.committed
    for record, drop in records.holding(s["scan_id"] for s in todo if s["scan_id"] in committed):
        rewrite_without(cfg.output.uri, cfg.storage, record, drop, "input changed", lease)


_WORK_KEYS = ("scan_id", "group", "kind", "uri", "files", "label", "stamp", "mask_uri")


def run_writers(
    cfg: IngestConfig,
    todo: list[dict],
    reports: dict[str, dict],
    api_key: Secret,
    content_key: Secret,
    purged: Purged,
    lease: Lease,
) -> list[dict]:
    """Submit one task per shard (up to `concurrency` at once), log progress, return the quarantine
    entries of the scans that killed their writer.

    Work items hold references only; each shard's reports travel through the object store, the
    API key, the content-hash key (Names.content_key) and the purged scans' content hashes too. A
    shard whose worker died is retried by Ray (`task_retries`), then split into one-scan shards
    queued like the others; a one-scan shard whose worker died quarantines its scan while the others
    go on. Storage down, a refused LLM key or a lost lease stop the job."""
    import ray

    ensure_ray(cfg.ray)
    shape = cfg.writer_shape()
    ensure_schedulable(shape, "ingest shard writer", cfg.ray.schedule_timeout_s)
    task = ray.remote(write_shard).options(
        num_cpus=shape["CPU"], num_gpus=shape.get("GPU", 0), memory=int(shape["memory"]), max_retries=cfg.task_retries
    )
    died = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)
    per = cfg.output.scans_per_shard
    work = [{k: s.get(k) for k in _WORK_KEYS} for s in todo]
    items = [_item(work[i : i + per], lease.token) for i in range(0, len(work), per)]
    cfg_json = cfg.model_dump_json()
    key_ref = ray.put(api_key)
    content_key_ref = ray.put(content_key)
    purged_ref = ray.put(frozenset(purged.content_hashes))
    queue = list(reversed(items))
    pending: dict[Any, dict[str, Any]] = {}
    killers: list[dict] = []
    progress = _Progress(len(items), len(todo))
    try:
        while queue or pending:
            while queue and (cfg.concurrency is None or len(pending) < cfg.concurrency):
                item = queue.pop()
                shard_reports = {s["scan_id"]: reports[s["scan_id"]] for s in item["scans"] if s["scan_id"] in reports}
                refs = (ray.put(shard_reports), key_ref, content_key_ref, purged_ref)
                pending[task.remote(cfg_json, item, *refs)] = item
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=10)
            lease.check()
            for ref in ready:
                item = pending.pop(ref)
                try:
                    record: CommitRecord = ray.get(ref)
                except died as e:
                    if len(item["scans"]) > 1:
                        singles = [_item([scan], item["lease_token"]) for scan in item["scans"]]
                        queue += reversed(singles)  # next, in the shard's order
                        progress.split(len(singles))
                        log.warning(
                            "shard %s: worker died; retrying its %d scans one by one to find the one that kills it",
                            item["shard"],
                            len(singles),
                        )
                    else:
                        killers.append(_killed(item["scans"][0], cfg.task_retries + 1, e))
                        log.error("%s %s", progress.done(1), killers[-1]["reason"])
                    continue
                log.info(
                    "%s %s: %d written, %d quarantined",
                    progress.done(len(item["scans"])),
                    record.shard,
                    len(record.scans),
                    len(record.quarantine),
                )
    except Exception as e:
        for ref in pending:
            ray.cancel(ref, force=False)
        cause = _ctray_cause(e)
        if cause is not None:
            raise type(cause)(str(cause)) from None
        raise
    return killers


def _item(scans: list[dict], lease_token: str) -> dict[str, Any]:
    """A shard's work item: its name (from its scans, so a retried one overwrites its own leftovers)
    and its scans' references."""
    return {"shard": shard_name(scans), "scans": scans, "lease_token": lease_token}


def _killed(scan: dict, deaths: int, e: BaseException) -> dict:
    """The quarantine entry of a scan whose one-scan shard's worker died every time, named by its
    label (its pseudonym under privacy.pseudonymize_ids, never its URI there)."""
    label = scan["label"]
    reason = (
        f"{label}: its shard writer died {deaths} time(s) while writing it ({type(e).__name__}: out of memory, a"
        " crash or a lost node); give the writers more memory (task_memory_gb) or leave the input out"
    )
    return {"scan_id": scan["scan_id"], "input": label, "reason": reason}


class _Progress:
    """The progress line's counts. A split shard is replaced by its one-scan shards, so the shard
    total grows; a scan that killed its writer counts as done (quarantined)."""

    def __init__(self, shards: int, scans: int) -> None:
        self.shards, self.scans = shards, scans
        self.done_shards = self.done_scans = 0
        self.t0 = time.time()

    def split(self, into: int) -> None:
        self.shards += into - 1

    def done(self, scans: int) -> str:
        """Count a finished shard of `scans` scans; the line's prefix with counts, rate and ETA."""
        self.done_shards += 1
        self.done_scans += scans
        rate = self.done_scans / max(time.time() - self.t0, 1e-9)
        left = (self.scans - self.done_scans) / rate if rate else 0
        return (
            f"[{self.done_shards}/{self.shards} shards, {self.done_scans}/{self.scans} scans, {rate:.2f} scans/s,"
            f" ETA {_duration(left)}]"
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _ctray_cause(e: BaseException) -> CtrayError | None:
    """The one-line ctray error behind an exception: itself, or the cause Ray wrapped (RayTaskError
    carries the task's exception as `.cause`), without Ray's traceback text."""
    import ray

    seen = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, ray.exceptions.RayTaskError):
            return link.cause if isinstance(link.cause, CtrayError) else None
        if isinstance(link, CtrayError):
            return link
        link = link.__cause__ or link.__context__
    return None
