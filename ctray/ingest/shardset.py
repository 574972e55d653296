"""A shard set as its manifest.json describes it: the one reader of the manifest, and the format
its writer (`ctray ingest`, `ctray purge`) serialises, commit records included.

`ctray ingest` writes committed Parquet shards (ctray.ingest.schema) and, at the end of every run, a
manifest.json next to them: the ingest config, the shards with their figures, and every input
accounted for (written, quarantined, skipped, failed, purged). Training, evaluation, embedding,
`ctray verify` and `ctray purge` open it with `ShardSet.open`, which checks the schema version and
turns the JSON into typed entries; ingest builds a ShardSet (ctray.ingest.records.build_manifest)
and publishes `to_json()`, so the writer and the readers agree on one format. Each shard's commit
record (_commits/<shard>.json), which the manifest is built from, is a CommitRecord the same way.

Only pydantic (the ingest config), fsspec and pyarrow paths at import, no torch: Ray Data's task
processes import ctray.data.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from pydantic import ValidationError

import ctray
from ctray.anatomy import anatomy_label_ids
from ctray.config import StorageConfig
from ctray.errors import ConfigError, first_line
from ctray.ingest.config import IngestConfig, PreprocessConfig
from ctray.ingest.schema import SCHEMA_CHANGES, SCHEMA_VERSION
from ctray.redact import redacted
from ctray.storage import arrow_filesystem, filesystem, is_remote, read_bytes, resolve_uri

MANIFEST = "manifest.json"
"""The manifest's name in the shard set's folder."""
INGEST_CONFIG = "ingest-config.yaml"
"""The ingest's config as `ctray ingest` reads it (redacted), in the shard set's folder."""
SHARDS_DIR = "shards"
"""The folder of the Parquet shards (part-<id>.parquet) in the shard set's folder."""
COMMITS_DIR = "_commits"
"""The folder of the commit records (part-<id>.json, CommitRecord) in the shard set's folder."""


class ScanRow(NamedTuple):
    """Where a reader finds one committed scan."""

    path: str
    """Its shard, as a path in the shard set's arrow filesystem (ctray.storage.arrow_filesystem)."""
    row_group: int
    """Its row group in that shard (ingest writes one row group per scan)."""


@dataclass(frozen=True)
class ShardStats:
    """A shard's figures, as its writer counted them (no report text)."""

    rows: int
    """Scans in the shard (one row, and one row group, each)."""
    voxels: int
    """Voxels of all its volumes."""
    bytes: int
    """Size of the Parquet file."""
    hu_min: int | None
    """Lowest HU of its volumes (None: no rows)."""
    hu_max: int | None
    """Highest HU of its volumes (None: no rows)."""
    with_label_map: int
    """Scans with a TotalSegmentator label map."""
    with_anatomy_texts: int
    """Scans with report sentences for at least one anatomy."""
    anatomies: dict[str, int]
    """Anatomy -> scans with a box of it."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardStats:
        """From its JSON object (a manifest's shard entry, or a commit record)."""
        return cls(
            int(d["rows"]),
            int(d["voxels"]),
            int(d["bytes"]),
            d["hu_min"],
            d["hu_max"],
            int(d["with_label_map"]),
            int(d["with_anatomy_texts"]),
            {str(k): int(v) for k, v in d["anatomies"].items()},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "voxels": self.voxels,
            "bytes": self.bytes,
            "hu_min": self.hu_min,
            "hu_max": self.hu_max,
            "with_label_map": self.with_label_map,
            "with_anatomy_texts": self.with_anatomy_texts,
            "anatomies": dict(self.anatomies),
        }


@dataclass(frozen=True)
class Shard:
    """One committed shard."""

    path: str
    """The Parquet file, relative to the shard set's root (shards/part-<id>.parquet)."""
    shard: str
    """Its name (part-<id>), also the name of its commit record under _commits/."""
    scans: int
    """Scans its commit record lists."""
    sha256: str
    """sha256 of the file (`ctray verify` checks it)."""
    bytes: int
    """Size of the file."""
    stats: ShardStats
    """Its figures (rows, voxels, HU range, masks, texts, anatomies)."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Shard:
        return cls(
            d["path"], d["shard"], int(d["scans"]), d["sha256"], int(d["bytes"]), ShardStats.from_json(d["stats"])
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "shard": self.shard,
            "scans": self.scans,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "stats": self.stats.to_json(),
        }


@dataclass(frozen=True)
class Written:
    """An input written to a shard."""

    scan_id: str
    """The scan's id in the shards (a pseudonym with privacy.pseudonymize_ids)."""
    input: str
    """The input's name as ingest reports it (its URI, unless privacy settings hide it)."""
    shard: str
    """The shard holding it (Shard.shard)."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Written:
        return cls(d["scan_id"], d["input"], d["shard"])

    def to_json(self) -> dict[str, Any]:
        return {"scan_id": self.scan_id, "input": self.input, "shard": self.shard}


@dataclass(frozen=True)
class Quarantined:
    """An input refused as a scan (not readable, not CT, no report, a duplicate id, ...)."""

    input: str
    """The input's name as ingest reports it."""
    reason: str
    """Why, one line naming the input."""
    scan_id: str | None = None
    """Its scan id ("" when a reports table row names no scan; None: the entry has none)."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Quarantined:
        """From its JSON object (a manifest's, an inventory's or a commit record's entry: other keys,
        such as a record's stamp, are not kept)."""
        return cls(d["input"], d["reason"], d.get("scan_id"))

    def to_json(self) -> dict[str, Any]:
        out = {} if self.scan_id is None else {"scan_id": self.scan_id}
        return {**out, "input": self.input, "reason": self.reason}


@dataclass(frozen=True)
class Skipped:
    """An input that is not a scan to ingest (not an image, not axial, removed by `ctray purge`)."""

    input: str
    """The input's name as ingest reports it."""
    reason: str
    """Why, one line naming the input."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Skipped:
        return cls(d["input"], d["reason"])

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input, "reason": self.reason}


@dataclass(frozen=True)
class Failed:
    """A shard whose writer died every time Ray ran it; its scans are not committed. Written by
    ingest before it split such shards and quarantined the scan that kills its writer; read so that
    those manifests still open (the next ingest retries the scans and lists none)."""

    shard: str
    """The shard's name."""
    scan_ids: tuple[str, ...]
    """The scans it was to hold."""
    reason: str
    """Why, one line."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Failed:
        return cls(d["shard"], tuple(d["scan_ids"]), d["reason"])

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "scan_ids": list(self.scan_ids), "reason": self.reason}


@dataclass(frozen=True)
class CommittedScan:
    """A scan a commit record lists: written to its shard."""

    scan_id: str
    """The scan's id in the shards (a pseudonym with privacy.pseudonymize_ids)."""
    input: str
    """The input's name as ingest reports it (its URI, unless privacy settings hide it)."""
    stamp: str
    """The input's stamp when it was written (ctray.ingest.discover.attach): a later ingest that
    finds another stamp rewrites the shard without it and writes it again."""
    content_hash: str
    """sha256 of the input's bytes (of a DICOM series: of its files' sha256s, in order), hex; with
    privacy.pseudonymize_ids "hmac-sha256:" + the HMAC-SHA256 of that digest under a key derived from
    the pseudonymisation key (ctray.ingest.privacy.content_hash), which links no row to its file
    without the key. `ctray purge` records it in purged.json."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommittedScan:
        return cls(d["scan_id"], d["input"], d["stamp"], d["content_hash"])

    def to_json(self) -> dict[str, Any]:
        return {"scan_id": self.scan_id, "input": self.input, "stamp": self.stamp, "content_hash": self.content_hash}


@dataclass(frozen=True)
class QuarantinedScan:
    """An input a shard writer refused, as its commit record lists it (the manifest lists it as
    Quarantined while the input is not written)."""

    scan_id: str
    """The scan's id."""
    input: str
    """The input's name as ingest reports it."""
    reason: str
    """Why, one line naming the input."""
    stamp: str
    """The input's stamp when it was refused."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuarantinedScan:
        return cls(d["scan_id"], d["input"], d["reason"], d["stamp"])

    def to_json(self) -> dict[str, Any]:
        return {"scan_id": self.scan_id, "input": self.input, "reason": self.reason, "stamp": self.stamp}

    def entry(self) -> Quarantined:
        """The manifest's entry for it."""
        return Quarantined(self.input, self.reason, self.scan_id)


@dataclass(frozen=True)
class CommitRecord:
    """A shard's commit record, _commits/<shard>.json: the shard counts only once it exists (its
    writer publishes it after the shard). Live unless a later record names it in `supersedes`."""

    shard: str
    """The shard's name (part-<id>), also the record's file name (<shard>.json)."""
    path: str | None
    """The Parquet file, relative to the shard set's root (shards/<shard>.parquet); None: the writer
    quarantined every scan and wrote no file."""
    sha256: str | None
    """sha256 of the file (None: no file)."""
    bytes: int
    """Size of the file (0: no file)."""
    scans: tuple[CommittedScan, ...]
    """The scans in the file, in row group order."""
    quarantine: tuple[QuarantinedScan, ...]
    """The inputs of the shard its writer refused."""
    supersedes: tuple[str, ...]
    """The shards this one replaces (a shard rewritten without some scans): their records and files
    are ignored, then removed by the next ingest."""
    stats: ShardStats
    """The shard's figures (rows, voxels, HU range, masks, texts, anatomies)."""
    parsers: dict[str, int]
    """Report parser -> scans whose report it split ("llm", "rules", "none", or "rules (llm failed:
    <reason>)" where the rules parser split a report the LLM parser failed on)."""
    fingerprint: str
    """Fingerprint of the preprocessing that made the shard (ShardSet.fingerprint)."""
    schema_version: int
    """Shard format version (ctray.ingest.schema.SCHEMA_VERSION)."""
    ctray_version: str
    """The ctray that wrote the record."""
    committed_at: float
    """When the record was made (seconds since the epoch); records are read in this order."""
    seconds: float
    """How long writing the shard took."""
    rewritten: str | None = None
    """Why the shard was rewritten from the one it supersedes ("input changed", "purged"); None: a
    shard writer wrote it (and the key is left out of the JSON)."""

    @classmethod
    def new(
        cls,
        *,
        shard: str,
        fingerprint: str,
        scans: Iterable[CommittedScan],
        quarantine: Iterable[QuarantinedScan],
        stats: ShardStats,
        sha256: str | None,
        started: float,
        parsers: dict[str, int] | None = None,
        supersedes: Iterable[str] = (),
        rewritten: str | None = None,
    ) -> CommitRecord:
        """The record of a shard written now, by this ctray, since `started` (time.time()): its file
        is shards/<shard>.parquet of `stats.bytes` bytes, unless `sha256` is None (no file)."""
        now = time.time()
        return cls(
            shard=shard,
            path=f"{SHARDS_DIR}/{shard}.parquet" if sha256 else None,
            sha256=sha256,
            bytes=stats.bytes,
            scans=tuple(scans),
            quarantine=tuple(quarantine),
            supersedes=tuple(supersedes),
            stats=stats,
            parsers=dict(parsers or {}),
            fingerprint=fingerprint,
            schema_version=SCHEMA_VERSION,
            ctray_version=ctray.__version__,
            committed_at=now,
            seconds=round(now - started, 3),
            rewritten=rewritten,
        )

    @property
    def record_path(self) -> str:
        """Where the record is, relative to the shard set's root (_commits/<shard>.json)."""
        return f"{COMMITS_DIR}/{self.shard}.json"

    def shard_entry(self) -> Shard | None:
        """The manifest's entry for its shard (None: no file)."""
        if self.path is None or self.sha256 is None:
            return None
        return Shard(self.path, self.shard, len(self.scans), self.sha256, self.bytes, self.stats)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommitRecord:
        """From its JSON object (as to_json writes it): a KeyError, TypeError or ValueError for an
        object that is not one."""
        return cls(
            shard=d["shard"],
            path=d["path"],
            sha256=d["sha256"],
            bytes=int(d["bytes"]),
            scans=tuple(CommittedScan.from_json(s) for s in d["scans"]),
            quarantine=tuple(QuarantinedScan.from_json(q) for q in d["quarantine"]),
            supersedes=tuple(d["supersedes"]),
            stats=ShardStats.from_json(d["stats"]),
            parsers={str(k): int(v) for k, v in d["parsers"].items()},
            fingerprint=d["fingerprint"],
            schema_version=d["schema_version"],
            ctray_version=d["ctray_version"],
            committed_at=d["committed_at"],
            seconds=d["seconds"],
            rewritten=d.get("rewritten"),
        )

    def to_json(self) -> dict[str, Any]:
        """Its JSON object, keys in the order ctray has always written them."""
        out = {
            "shard": self.shard,
            "path": self.path,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "scans": [s.to_json() for s in self.scans],
            "quarantine": [q.to_json() for q in self.quarantine],
            "supersedes": list(self.supersedes),
            "stats": self.stats.to_json(),
            "parsers": dict(self.parsers),
            "fingerprint": self.fingerprint,
            "schema_version": self.schema_version,
            "ctray_version": self.ctray_version,
            "committed_at": self.committed_at,
            "seconds": self.seconds,
        }
        return out if self.rewritten is None else {**out, "rewritten": self.rewritten}


@dataclass(frozen=True)
class Counts:
    """The manifest's summary: every input is written, quarantined, skipped or in a failed shard."""

    inputs: int
    """Inputs accounted for: written + quarantined + skipped + failed."""
    written: int
    """Inputs written as scans."""
    quarantined: int
    """Inputs quarantined."""
    skipped: int
    """Inputs skipped."""
    failed: int
    """Scans of failed shards."""
    scans: int
    """Committed scans (= written)."""
    shards: int
    """Committed shards."""
    bytes: int
    """Size of all committed shards."""
    llm_fallbacks: dict[str, int]
    """Reports the LLM parser failed on, by reason (the rules parser split them instead)."""
    ungrouped: int
    """Scans the ingest's `groups:` setting placed in no group (each is its own group), as the
    last run's discovery counted them; 0 without a grouping."""


def _other_schema(uri: str, version: Any, writer: Any) -> str:
    """The one line refusing a shard set of schema `version`: for an older one, what changed since
    and the command that writes it again in this ctray's format."""
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return (
            f"{uri} holds shards of schema v{version}; this ctray reads v{SCHEMA_VERSION}: read it with the ctray that"
            f" wrote it ({writer}) or a later one"
        )
    since = version if isinstance(version, int) else 0
    changed = "; ".join(f"v{v}: {what}" for v, what in sorted(SCHEMA_CHANGES.items()) if v > since)
    # `ctray ingest` reads its config from a local file only; an absolute path works from anywhere.
    config = posixpath.join(uri if is_remote(uri) else resolve_uri(uri), INGEST_CONFIG)
    config = f"<a local copy of {config}>" if is_remote(uri) else shlex.quote(config)
    return (
        f"{uri} holds shards of schema v{version}; this ctray reads v{SCHEMA_VERSION} ({changed}): re-ingest with"
        f" `ctray ingest {config} output.uri=<a new folder>`"
    )


@dataclass(frozen=True)
class ShardSet:
    """A shard set: the committed shards ingest wrote under `uri`, as manifest.json lists them."""

    uri: str
    """Folder or URI of the shard set (it holds manifest.json, shards/ and _commits/)."""
    storage: StorageConfig
    """How this process reaches `uri` (not part of the manifest: another reader may use another
    endpoint)."""
    schema_version: int
    """Shard format version (ctray.ingest.schema.SCHEMA_VERSION); open() reads only this ctray's."""
    ctray_version: str
    """The ctray that wrote the manifest."""
    created_at: str
    """When the manifest was written (UTC, ISO 8601)."""
    fingerprint: str
    """Fingerprint of the preprocessing (ctray.ingest.shards.preprocess_fingerprint): ingest refuses
    to add shards made with other settings to this set."""
    ingest: IngestConfig
    """The ingest config the shards were written with (its output and storage as that run had
    them); `preprocess` and `anatomies` are read from it."""
    shards: tuple[Shard, ...]
    """Committed shards, in commit order."""
    written: tuple[Written, ...]
    """Every written input, by scan id."""
    quarantine: tuple[Quarantined, ...]
    """Quarantined inputs not written since, by input."""
    skipped: tuple[Skipped, ...]
    """Inputs the last run skipped, by input."""
    failed: tuple[Failed, ...]
    """Shards the last run could not write, in manifests of an ingest that did not yet split them
    (their scans' worker deaths are quarantined now); re-running ingest retries them."""
    purged: tuple[str, ...]
    """Scan ids removed by `ctray purge` (never ingested again), sorted. purged.json holds their
    content hashes too (ctray.ingest.job.Purged)."""
    llm_fallbacks: dict[str, int]
    """Reports the LLM parser failed on, by reason (the rules parser split them instead)."""
    ungrouped: int
    """Scans the last run's `groups:` setting placed in no group (each is its own; a count, never
    the ids)."""

    @property
    def preprocess(self) -> PreprocessConfig:
        """The geometry and intensity handling of every scan: orientation, spacing, foreground
        crop, accepted HU range, the anatomy groups (ctray.ingest.config.PreprocessConfig)."""
        return self.ingest.preprocess

    @property
    def anatomies(self) -> dict[str, list[int]]:
        """Anatomy name -> TotalSegmentator label ids: the groups the shards' boxes and report
        texts are keyed by."""
        return anatomy_label_ids(self.preprocess.anatomies)

    @property
    def scan_count(self) -> int:
        """Committed scans (0 for an empty set)."""
        return sum(s.stats.rows for s in self.shards)

    @property
    def counts(self) -> Counts:
        """The manifest's summary, counted from its entries."""
        failed = sum(len(f.scan_ids) for f in self.failed)
        return Counts(
            inputs=len(self.written) + len(self.quarantine) + len(self.skipped) + failed,
            written=len(self.written),
            quarantined=len(self.quarantine),
            skipped=len(self.skipped),
            failed=failed,
            scans=len(self.written),
            shards=len(self.shards),
            bytes=sum(s.bytes for s in self.shards),
            llm_fallbacks=dict(self.llm_fallbacks),
            ungrouped=self.ungrouped,
        )

    @property
    def manifest_uri(self) -> str:
        """Where manifest.json is (for messages)."""
        return posixpath.join(self.uri, MANIFEST)

    def scans(self) -> list[ScanRow]:
        """One entry per committed scan, in manifest order; a ConfigError when there is none (a
        reader that needs scans cannot go on)."""
        if not self.scan_count:
            raise ConfigError(f"{self.uri}: the manifest lists no scans")
        _, root = arrow_filesystem(self.uri, self.storage)
        return [ScanRow(posixpath.join(root, s.path), i) for s in self.shards for i in range(s.stats.rows)]

    def shard_paths(self) -> list[str]:
        """The paths of the shards holding scans, in the arrow filesystem and manifest order (as
        scans() names them); a ConfigError when there is no scan."""
        if not self.scan_count:
            raise ConfigError(f"{self.uri}: the manifest lists no scans")
        _, root = arrow_filesystem(self.uri, self.storage)
        return [posixpath.join(root, s.path) for s in self.shards if s.stats.rows]

    def digests(self) -> dict[str, str]:
        """Each shard's sha256, by its path in the arrow filesystem (as scans() names it)."""
        _, root = arrow_filesystem(self.uri, self.storage)
        return {posixpath.join(root, s.path): s.sha256 for s in self.shards}

    @classmethod
    def open(cls, uri: str, storage: StorageConfig) -> ShardSet:
        """Read `uri`'s manifest.json (once). A ConfigError of one line when there is none, it is
        not JSON or not a manifest, or it describes shards of another schema version."""
        fs, root = filesystem(uri, storage)
        try:
            text = read_bytes(fs, posixpath.join(root, MANIFEST), storage)
        except FileNotFoundError:
            raise ConfigError(f"{uri} has no {MANIFEST}; run `ctray ingest` first") from None
        return cls.from_json(text, uri, storage)

    @classmethod
    def from_json(cls, text: str | bytes, uri: str, storage: StorageConfig) -> ShardSet:
        """Parse the manifest's text (as to_json writes it) of the shard set at `uri`."""
        where = posixpath.join(uri, MANIFEST)
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{where} is not valid JSON ({first_line(e)}); re-run `ctray ingest` to rebuild it"
            ) from None
        if not isinstance(d, dict):
            raise ConfigError(f"{where} is not a ctray manifest (a JSON {type(d).__name__}, not an object)")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(_other_schema(uri, d.get("schema_version"), d.get("ctray_version")))
        try:
            ingest = IngestConfig.model_validate(d["config"])
        except ValidationError as e:
            error = e.errors()[0]
            at = ".".join(str(p) for p in error["loc"])
            raise ConfigError(
                f"{where}: its ingest config does not validate in this ctray (config.{at}: {error['msg']})"
            ) from None
        except KeyError as e:
            raise ConfigError(f"{where} is not a ctray manifest (no {e} key)") from None
        try:
            return cls(
                uri=uri,
                storage=storage,
                schema_version=d["schema_version"],
                ctray_version=d["ctray_version"],
                created_at=d["created_at"],
                fingerprint=d["fingerprint"],
                ingest=ingest,
                shards=tuple(Shard.from_json(s) for s in d["shards"]),
                written=tuple(Written.from_json(w) for w in d["written"]),
                quarantine=tuple(Quarantined.from_json(q) for q in d["quarantine"]),
                skipped=tuple(Skipped.from_json(s) for s in d["skipped"]),
                failed=tuple(Failed.from_json(f) for f in d["failed"]),
                purged=tuple(d["purged"]),
                llm_fallbacks={str(k): int(v) for k, v in d["counts"]["llm_fallbacks"].items()},
                ungrouped=int(d["counts"]["ungrouped"]),
            )
        except KeyError as e:
            raise ConfigError(f"{where} is not a ctray manifest (no {e} key)") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where} is not a ctray manifest ({type(e).__name__}: {first_line(e)})") from None

    def to_json(self) -> str:
        """The manifest's text (what from_json reads back): indented JSON, in the order ingest has
        always written it. Its config is redacted (ctray.redact) like a logged one: the manifest
        sits beside the shards, readable by everyone who trains on them."""
        return json.dumps(
            {
                "schema_version": self.schema_version,
                "ctray_version": self.ctray_version,
                "created_at": self.created_at,
                "fingerprint": self.fingerprint,
                "config": redacted(self.ingest.model_dump(mode="json")),
                "counts": asdict(self.counts),
                "shards": [s.to_json() for s in self.shards],
                "written": [w.to_json() for w in self.written],
                "quarantine": [q.to_json() for q in self.quarantine],
                "skipped": [s.to_json() for s in self.skipped],
                "failed": [f.to_json() for f in self.failed],
                "purged": list(self.purged),
            },
            indent=1,
        )
