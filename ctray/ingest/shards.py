"""One Ray task = one shard: read, check and preprocess its scans, write one Parquet file.

A shard is published only when complete (storage.publish_file), then a small commit record
(_commits/<shard>.json, a ctray.ingest.shardset.CommitRecord) names its scans (with each input's
stamp and content hash: sha256, or keyed where ids are pseudonymised, ctray.ingest.privacy), the
shard's sha256 and size, its quarantined inputs and its parser outcomes. Readers and resumed runs
trust commit records only, so a crash at any point loses at most the shard in flight. A commit
record may supersede earlier ones (a shard rewritten without a changed or purged scan): the
superseded records and their shards are ignored, then removed by the next ingest.

What leaves a task is PHI-free by construction: work items carry references (URIs and ids),
reports arrive through the object store (and so do the content-hash key and the content hashes of
purged scans, whose copies under another name the writer quarantines), and every error is reduced
here to ctray's one-line reason (the input's label, the check, measured figures; for a bug, the
exception type and code location, never its message, which could quote a report or a header value).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import ctray
from ctray.anatomy import anatomy_label_ids
from ctray.config import StorageConfig
from ctray.errors import BadInput, CtrayError, StorageError
from ctray.ingest.config import IngestConfig
from ctray.ingest.dicom import load_series
from ctray.ingest.lease import LeaseHeld, lease_is_ours
from ctray.ingest.llm import CACHE_DIR, PROMPT_VERSION, LLMEndpointError, Parsed, Secret
from ctray.ingest.preprocess import anatomy_boxes, preprocess
from ctray.ingest.privacy import content_hash
from ctray.ingest.reports import RuleParser
from ctray.ingest.schema import SCHEMA_VERSION, SHARD_SCHEMA, BulkCodec, writer_options
from ctray.ingest.shardset import SHARDS_DIR, CommitRecord, CommittedScan, QuarantinedScan, ShardStats
from ctray.ingest.volume import RawVolume, load_nifti
from ctray.storage import filesystem, is_remote, join, publish_bytes, publish_file, resolve_uri, with_retries

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


def shard_name(scans: list[dict]) -> str:
    """Deterministic name from the shard's scans and their stamps: a retried shard overwrites its
    own leftovers, and a changed input never lands on a committed shard's name."""
    keys = sorted(f"{s['scan_id']}\0{s.get('stamp', '')}" for s in scans)
    return "part-" + hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]


def preprocess_fingerprint(cfg: IngestConfig) -> str:
    """Hash of every setting that changes the stored rows, and of the ctray version; resuming into
    shards made otherwise is refused."""
    keyed = {
        "ctray": ctray.__version__,
        "schema": SCHEMA_VERSION,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "input": cfg.input.model_dump(mode="json", exclude={"scans"}),
        "reports": {
            "parser": cfg.reports.parser,
            **({"model": cfg.reports.llm.model, "prompt": PROMPT_VERSION} if cfg.reports.parser == "llm" else {}),
        },
        "groups": cfg.groups.model_dump(mode="json"),
        "privacy": {
            "ids": cfg.privacy.pseudonymize_ids,
            "report_text": cfg.privacy.keep_report_text,
            "paths": cfg.privacy.source_paths,
        },
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest


_STATS_COLUMNS = [f.name for f in SHARD_SCHEMA if not pa.types.is_nested(f.type) and f.type != pa.large_binary()]
"""The columns a shard keeps Parquet statistics of: the flat ones (ids, stamps, parser names). The
volume's and label map's min and max are megabytes long: Parquet computes them (about 20 ms per
512x512x300 scan) and then leaves them out of the file; no reader prunes on the lists."""


def open_shard(path: str, compression_level: int, bulk_codec: BulkCodec = "lz4") -> pq.ParquetWriter:
    """A shard's Parquet writer: the volume and label map in `bulk_codec`, the rest zstd at
    `compression_level` (schema.writer_options), no dictionaries, statistics of the flat columns
    only; rows go in with `write_row`."""
    return pq.ParquetWriter(
        path, SHARD_SCHEMA, **writer_options(bulk_codec, compression_level), write_statistics=_STATS_COLUMNS
    )


def write_row(writer: pq.ParquetWriter, row: dict) -> None:
    """One scan's row as its own row group, so that readers stream a shard scan by scan."""
    writer.write_table(pa.Table.from_pylist([row], schema=SHARD_SCHEMA))


def bug_reason(label: str, e: BaseException) -> str:
    """A one-line reason for an unexpected exception: its type and the innermost ctray frame."""
    frames = [
        f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}ctray{os.sep}" in f.filename
    ] or traceback.extract_tb(e.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{label}: unexpected {type(e).__name__}{where} (a ctray bug or an input it does not handle)"


def log_bug(reason: str, e: BaseException) -> None:
    """The reason plus the code path (frames only: file, line, code; no exception message)."""
    log.error("%s\n%s", reason, "".join(traceback.format_list(traceback.extract_tb(e.__traceback__))))


class ShardWriter:
    """Turns a work item into a published shard and its commit record. Built once per worker
    process (`writer_for`): the report parser and the segmenter stay warm across tasks."""

    def __init__(self, cfg: IngestConfig, api_key: Secret) -> None:
        self.cfg = cfg
        self.fs_out, self.root = filesystem(cfg.output.uri, cfg.storage)
        self.groups = anatomy_label_ids(cfg.preprocess.anatomies)
        self.rules = RuleParser(list(cfg.preprocess.anatomies))
        self.llm = None
        if cfg.reports.parser == "llm":
            from ctray.ingest.llm import LLMParser

            self.llm = LLMParser(
                cfg.reports.llm,
                list(cfg.preprocess.anatomies),
                self.rules,
                self.fs_out,
                join(self.root, CACHE_DIR),
                cfg.storage,
                api_key,
            )
        self.segmenter = None
        if cfg.input.segment:
            from ctray.ingest.segment import Segmenter

            self.segmenter = Segmenter(cfg.input.segment_fast)
        self.fingerprint = preprocess_fingerprint(cfg)

    def parse(self, text: str) -> Parsed:
        if self.llm is not None:
            return self.llm(text)
        return Parsed(self.rules(text), "rules", None)

    def write(self, item: dict, reports: dict[str, dict], content_key: Secret, purged: frozenset[str]) -> CommitRecord:
        """Write the shard of work item `item` and commit it. `content_key`: the key of the content
        hashes (Names.content_key); `purged`: the content hashes of purged scans, whose copies are
        quarantined."""
        scans, name = item["scans"], item["shard"]
        started = time.time()
        quarantine: list[QuarantinedScan] = []
        written: list[CommittedScan] = []
        parsers: collections.Counter = collections.Counter()
        stats = _Stats()
        digest = None
        with tempfile.TemporaryDirectory(prefix="ctray-shard-") as tmp:
            local = os.path.join(tmp, name + ".parquet")
            writer = None
            for k, scan in enumerate(scans):
                scan_tmp = os.path.join(tmp, f"scan{k}")  # one folder per scan: a scan and its mask never share a path
                os.makedirs(scan_tmp)
                try:
                    row = self._row(scan, reports.get(scan["scan_id"]), scan_tmp, content_key, purged)
                except BadInput as e:
                    quarantine.append(QuarantinedScan(scan["scan_id"], scan["label"], str(e), scan["stamp"]))
                    log.warning("quarantined %s", e)
                    continue
                except (StorageError, LLMEndpointError):
                    raise
                except Exception as e:  # a bug must not cost the rest of the shard
                    reason = bug_reason(scan["label"], e)
                    quarantine.append(QuarantinedScan(scan["scan_id"], scan["label"], reason, scan["stamp"]))
                    log_bug("quarantined " + reason, e)
                    continue
                finally:
                    shutil.rmtree(scan_tmp, ignore_errors=True)
                if writer is None:
                    writer = open_shard(local, self.cfg.output.compression_level, self.cfg.output.bulk_codec)
                write_row(writer, row)
                stats.add(row)
                parsers[row["report_parser"] or "none"] += 1
                written.append(CommittedScan(row["scan_id"], scan["label"], row["stamp"], row["content_hash"]))
            if writer is not None:
                writer.close()
                digest = file_sha256(local).hexdigest()
                stats.bytes = os.path.getsize(local)
                publish_file(local, self.fs_out, join(self.root, SHARDS_DIR, name + ".parquet"), self.cfg.storage)
        record = CommitRecord.new(
            shard=name,
            fingerprint=self.fingerprint,
            scans=written,
            quarantine=quarantine,
            stats=stats.shard_stats(),
            sha256=digest,
            started=started,
            parsers=dict(parsers),
        )
        self.commit(record, item.get("lease_token"))
        return record

    def commit(self, record: CommitRecord, lease_token: str | None) -> None:
        if lease_token is not None and not lease_is_ours(self.cfg.output.uri, self.cfg.storage, lease_token):
            raise LeaseHeld(
                f"shard {record.shard}: this ingest no longer holds the lease on {self.cfg.output.uri}; not committed"
            )
        publish_record(record, self.fs_out, self.root, self.cfg.storage)

    def _fetch(self, uri: str, tmp: str, label: str) -> tuple[str, hashlib._Hash]:
        """A local path for `uri` (downloaded into `tmp` when remote) and the sha256 of its bytes.
        Failures name the input by `label` (its pseudonym where ids are pseudonymised), and then
        carry no storage client's message, which would quote the URI."""
        quote = not self.cfg.privacy.pseudonymize_ids
        if not is_remote(uri):
            local = resolve_uri(uri)
        else:
            fs, path = filesystem(uri, self.cfg.storage)
            os.makedirs(tmp, exist_ok=True)
            # Not the input's own name: a reader's message quoting the local path must not name it either.
            local = os.path.join(tmp, "input" + "".join(Path(path).suffixes[-2:]))
            with_retries(lambda: fs.get_file(path, local), f"download {label}", self.cfg.storage, quote)
        try:
            return local, file_sha256(local)
        except FileNotFoundError:
            raise BadInput(f"{label}: file vanished before it could be read") from None

    def _row(self, scan: dict, report: dict | None, tmp: str, content_key: Secret, purged: frozenset[str]) -> dict:
        cfg = self.cfg
        label = scan["label"]
        report_text = None
        if cfg.input.reports:
            if report is None:
                report = {"text": None, "problem": "no report for this scan in the reports table", "labels": {}}
            if report["problem"] and cfg.input.require_report:
                raise BadInput(f"{label}: {report['problem']}")
            report_text = report["text"]
        max_voxels = cfg.preprocess.max_voxels
        locals_: list[str] = []  # the input's files, here
        if scan["kind"] == "dicom":
            digest = hashlib.sha256()
            for i, f in enumerate(scan["files"]):
                local, d = self._fetch(f, os.path.join(tmp, "series", str(i)), label)
                digest.update(d.digest())
                locals_.append(local)
        else:
            local, digest = self._fetch(scan["uri"], os.path.join(tmp, "scan"), label)
            locals_.append(local)
        stored_hash = content_hash(digest.digest(), content_key)
        # Checked before anything is read or parsed: a purged scan's report must not reach the LLM
        # (and its cache) again because its file came back under another name.
        if stored_hash in purged:
            raise BadInput(f"{label}: same content as a scan removed by `ctray purge`; not ingested again")
        if scan["kind"] == "dicom":
            raw = load_series(locals_, label, cfg.input.dicom)
        else:
            raw = load_nifti(locals_[0], label, max_voxels, quote_errors=not cfg.privacy.pseudonymize_ids)

        mask: RawVolume | None = None
        if scan.get("mask_uri"):
            mask_label = f"{label}: its mask" if cfg.privacy.pseudonymize_ids else f"{label}: mask {scan['mask_uri']}"
            mask_local, _ = self._fetch(scan["mask_uri"], os.path.join(tmp, "mask"), mask_label)
            mask = load_nifti(mask_local, mask_label, max_voxels, quote_errors=not cfg.privacy.pseudonymize_ids)
        elif self.segmenter is not None:
            mask = self.segmenter(raw)
        elif cfg.input.masks and cfg.input.require_mask:
            raise BadInput(f"{label}: no mask named like it in {cfg.input.masks}")

        pre = preprocess(raw, mask, cfg.preprocess)
        parsed = self.parse(report_text) if report_text else None
        labels = (report or {}).get("labels") or {}
        keep_paths = cfg.privacy.source_paths
        return {
            "scan_id": scan["scan_id"],
            "group": scan["group"],
            "volume": pre.hu.tobytes(),
            "shape": list(pre.hu.shape),
            "spacing": list(pre.spacing),
            "orientation": cfg.preprocess.orientation,
            "affine": pre.affine.reshape(-1).tolist(),
            "label_map": pre.labels.tobytes() if pre.labels is not None else None,
            "anatomy_boxes": anatomy_boxes(pre.labels, self.groups) if pre.labels is not None else [],
            "anatomy_texts": [{"anatomy": a, "sentences": s} for a, s in (parsed.findings if parsed else {}).items()],
            "report_text": report_text if cfg.privacy.keep_report_text else None,
            "report_parser": parsed.parser if parsed else None,
            "report_cache_key": parsed.cache_key if parsed else None,
            "labels": [{"name": k, "value": v} for k, v in sorted(labels.items())],
            "source": scan["uri"] if keep_paths else None,
            "mask_source": (scan.get("mask_uri") or "TotalSegmentator") if mask is not None and keep_paths else None,
            "content_hash": stored_hash,
            "stamp": scan["stamp"],
        }


def publish_record(record: CommitRecord, fs: fsspec.AbstractFileSystem, root: str, storage: StorageConfig) -> None:
    """Publish (or replace) `record` in the shard set at `root`: from then on its shard counts."""
    publish_bytes(json.dumps(record.to_json()).encode(), fs, join(root, record.record_path), storage)


_WRITERS: dict[str, ShardWriter] = {}


def writer_for(cfg_json: str, api_key: Secret) -> ShardWriter:
    """This worker process's writer for the config (Ray reuses worker processes across tasks)."""
    key = hashlib.sha1(cfg_json.encode() + (api_key.value or "").encode()).hexdigest()
    if key not in _WRITERS:
        _WRITERS.clear()
        _WRITERS[key] = ShardWriter(IngestConfig.model_validate_json(cfg_json), api_key)
    return _WRITERS[key]


def write_shard(
    cfg_json: str,
    item: dict,
    reports: dict[str, dict],
    api_key: Secret,
    content_key: Secret,
    purged: frozenset[str],
) -> CommitRecord:
    """The Ray task: one shard, its commit record returned (ShardWriter.write). Errors leave as
    ctray's one-line errors without a chained cause (a cause's message could quote an input)."""
    try:
        return writer_for(cfg_json, api_key).write(item, reports, content_key, purged)
    except CtrayError as e:
        raise type(e)(str(e)) from None
    except Exception as e:  # a bug: reported by type and place, never by message
        reason = bug_reason(f"shard {item['shard']}", e)
        log_bug(reason, e)
        raise CtrayError(reason) from None


class _Stats:
    """Per-shard figures for the manifest (no report text)."""

    def __init__(self) -> None:
        self.rows = 0
        self.voxels = 0
        self.bytes = 0
        self.hu_min: int | None = None
        self.hu_max: int | None = None
        self.with_labels = 0
        self.with_texts = 0
        self.anatomies: dict[str, int] = {}

    def add(self, row: dict) -> None:
        hu = np.frombuffer(row["volume"], dtype=np.int16)
        lo, hi = int(hu.min()), int(hu.max())
        self.hu_min = lo if self.hu_min is None else min(self.hu_min, lo)
        self.hu_max = hi if self.hu_max is None else max(self.hu_max, hi)
        self.rows += 1
        self.voxels += hu.size
        self.with_labels += row["label_map"] is not None
        self.with_texts += bool(row["anatomy_texts"])
        for box in row["anatomy_boxes"]:
            self.anatomies[box["anatomy"]] = self.anatomies.get(box["anatomy"], 0) + 1

    def shard_stats(self) -> ShardStats:
        """The figures as the commit record and the manifest hold them."""
        counts = (self.rows, self.voxels, self.bytes, self.hu_min, self.hu_max, self.with_labels, self.with_texts)
        return ShardStats(*counts, dict(self.anatomies))
