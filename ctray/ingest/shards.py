"""One Ray Data task = one shard: read, check and preprocess its scans, write one Parquet file.

A shard is published only when complete (storage.publish_file), then a small commit record
(_commits/<shard>.json) names its scans, stats and quarantined inputs. Readers and resumed runs
trust commit records only, so a crash at any point loses at most the shard in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import traceback

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctray.data.schema import SCHEMA_VERSION, SHARD_SCHEMA
from ctray.errors import BadInput, StorageError
from ctray.ingest.anatomy import anatomy_label_ids
from ctray.ingest.config import IngestConfig
from ctray.ingest.preprocess import anatomy_boxes, preprocess
from ctray.ingest.reports import RuleParser
from ctray.ingest.volume import RawVolume, load_dicom_series, load_nifti
from ctray.storage import filesystem, is_remote, join, publish_bytes, publish_file, resolve_uri, with_retries

log = logging.getLogger(__name__)

COMMITS_DIR = "_commits"
SHARDS_DIR = "shards"
_HASH_CHUNK = 1 << 20


def shard_name(scan_ids: list[str]) -> str:
    """Deterministic name from the shard's scans: a retried shard overwrites its own leftovers."""
    return "part-" + hashlib.sha1("\0".join(sorted(scan_ids)).encode()).hexdigest()[:16]


def preprocess_fingerprint(cfg: IngestConfig) -> str:
    """Hash of everything that changes the stored rows; resuming into shards made otherwise is refused."""
    keyed = {"schema": SCHEMA_VERSION, "preprocess": cfg.preprocess.model_dump(mode="json"), "parser": cfg.reports.parser}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str) -> "hashlib._Hash":
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest


class ShardWriter:
    """Ray Data callable class (an actor keeps the report parser and segmenter warm)."""

    def __init__(self, cfg: dict):
        self.cfg = IngestConfig.model_validate(cfg)
        self.fs_out, self.root = filesystem(self.cfg.output.uri, self.cfg.storage)
        self.groups = anatomy_label_ids(self.cfg.preprocess.anatomies)
        rules = RuleParser(list(self.cfg.preprocess.anatomies))
        if self.cfg.reports.parser == "llm":
            from ctray.ingest.llm import LLMParser

            self.parse = LLMParser(
                self.cfg.reports.llm, list(self.cfg.preprocess.anatomies), rules, self.fs_out,
                join(self.root, "_cache", "llm"), self.cfg.storage,
            )
        else:
            self.parse = lambda text: (rules(text), "rules")
        self.segmenter = None
        if self.cfg.input.segment:
            from ctray.ingest.segment import Segmenter

            self.segmenter = Segmenter(self.cfg.input.segment_fast)
        self.fingerprint = preprocess_fingerprint(self.cfg)

    def __call__(self, item: dict) -> dict:
        scans = json.loads(item["scans"])
        name = item["shard"]
        started = time.time()
        quarantine: list[dict] = []
        written: list[str] = []
        stats = _Stats()
        with tempfile.TemporaryDirectory(prefix="ctray-shard-") as tmp:
            local = os.path.join(tmp, name + ".parquet")
            writer = None
            for scan in scans:
                try:
                    row = self._row(scan, tmp)
                except BadInput as e:
                    quarantine.append({"scan_id": scan["scan_id"], "input": scan["uri"], "reason": str(e)})
                    log.warning("quarantined %s", e)
                    continue
                except StorageError:
                    raise
                except Exception as e:  # a bug must not cost the rest of the shard; keep its trace
                    reason = f"{scan['uri']}: unexpected {type(e).__name__}: {str(e)[:200]}"
                    quarantine.append({"scan_id": scan["scan_id"], "input": scan["uri"], "reason": reason})
                    log.error("quarantined %s\n%s", reason, traceback.format_exc())
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(
                        local, SHARD_SCHEMA, compression="zstd",
                        compression_level=self.cfg.output.compression_level, use_dictionary=False,
                    )
                writer.write_table(pa.Table.from_pylist([row], schema=SHARD_SCHEMA))
                stats.add(row)
                written.append(scan["scan_id"])
            shard_path = None
            if writer is not None:
                writer.close()
                shard_path = join(self.root, SHARDS_DIR, name + ".parquet")
                publish_file(local, self.fs_out, shard_path, self.cfg.storage)
                stats.bytes = os.path.getsize(local)
        record = {
            "shard": name,
            "path": f"{SHARDS_DIR}/{name}.parquet" if shard_path else None,
            "scan_ids": written,
            "quarantine": quarantine,
            "stats": stats.as_dict(),
            "fingerprint": self.fingerprint,
            "schema_version": SCHEMA_VERSION,
            "committed_at": time.time(),
            "seconds": round(time.time() - started, 3),
        }
        publish_bytes(json.dumps(record).encode(), self.fs_out, join(self.root, COMMITS_DIR, name + ".json"), self.cfg.storage)
        return {"shard": name, "record": json.dumps(record)}

    def _fetch(self, uri: str, tmp: str) -> tuple[str, "hashlib._Hash"]:
        """A local path for `uri` (downloaded when remote) and the sha256 of its bytes."""
        if not is_remote(uri):
            local = resolve_uri(uri)
        else:
            fs, path = filesystem(uri, self.cfg.storage)
            local = os.path.join(tmp, os.path.basename(path))
            with_retries(lambda: fs.get_file(path, local), f"download {uri}", self.cfg.storage)
        try:
            return local, file_sha256(local)
        except FileNotFoundError as e:
            raise BadInput(f"{uri}: file vanished before it could be read") from e

    def _row(self, scan: dict, tmp: str) -> dict:
        cfg = self.cfg
        report = scan.get("report")
        report_text = None
        if cfg.input.reports:
            if report is None:
                report = {"text": None, "problem": "no report for this scan in the reports table", "labels": {}}
            if report["problem"] and cfg.input.require_report:
                raise BadInput(f"{scan['uri']}: {report['problem']} ({cfg.input.reports})")
            report_text = report["text"]

        if scan["kind"] == "dicom":
            digest = hashlib.sha256()
            locals_ = []
            for f in scan["files"]:
                local, d = self._fetch(f, tmp)
                digest.update(d.digest())
                locals_.append(local)
            raw = load_dicom_series(locals_, scan["uri"])
        else:
            local, digest = self._fetch(scan["uri"], tmp)
            raw = load_nifti(local, scan["uri"])

        mask: RawVolume | None = None
        if scan.get("mask_uri"):
            mask_local, _ = self._fetch(scan["mask_uri"], tmp)
            mask = load_nifti(mask_local, scan["mask_uri"])
        elif self.segmenter is not None:
            mask = self.segmenter(raw)
        elif cfg.input.masks and cfg.input.require_mask:
            raise BadInput(f"{scan['uri']}: no mask named {scan['scan_id']}.nii[.gz] in {cfg.input.masks}")

        pre = preprocess(raw, mask, cfg.preprocess)
        texts, parser = ({}, None)
        if report_text:
            texts, parser = self.parse(report_text)
        labels = (report or {}).get("labels") or {}
        return {
            "scan_id": scan["scan_id"],
            "volume": pre.hu.tobytes(),
            "shape": list(pre.hu.shape),
            "spacing": list(pre.spacing),
            "orientation": cfg.preprocess.orientation,
            "affine": pre.affine.reshape(-1).tolist(),
            "label_map": pre.labels.tobytes() if pre.labels is not None else None,
            "anatomy_boxes": anatomy_boxes(pre.labels, self.groups) if pre.labels is not None else [],
            "anatomy_texts": [{"anatomy": a, "sentences": s} for a, s in texts.items()],
            "report_text": report_text,
            "report_parser": parser,
            "labels": [{"name": k, "value": v} for k, v in sorted(labels.items())],
            "source": scan["uri"],
            "mask_source": mask.source if mask is not None else None,
            "content_hash": digest.hexdigest(),
        }


class _Stats:
    """Per-shard figures for the manifest (no report text)."""

    def __init__(self):
        self.rows = 0
        self.voxels = 0
        self.bytes = 0
        self.hu_min = None
        self.hu_max = None
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

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "voxels": self.voxels, "bytes": self.bytes, "hu_min": self.hu_min,
            "hu_max": self.hu_max, "with_label_map": self.with_labels, "with_anatomy_texts": self.with_texts,
            "anatomies": self.anatomies,
        }
