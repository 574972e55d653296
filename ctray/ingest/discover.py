"""Every input under the scans root, accounted for: NIfTI scans by name, DICOM series by content
(probed in Ray tasks, cached per folder), everything else skipped with its reason; masks and
reports matched to scans; a stamp per scan that tells a changed input from an unchanged one.

Nothing here reads pixel data, and nothing from a file's content but DICOM header geometry and
series tags reaches the driver (and, with `groups.dicom`, the PatientID or StudyInstanceUID, which
the driver pseudonymises before it caches or stores it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.ingest.config import IngestConfig
from ctray.ingest.dicom import PREAMBLE_BYTES, Probe, Series, probe_folder, series_ids
from ctray.ingest.privacy import Names
from ctray.ingest.reports import ReportTable, parse_label_table, parse_report_table
from ctray.storage import (
    Entry,
    filesystem,
    is_remote,
    join,
    list_entries,
    publish_bytes,
    read_bytes,
    read_many,
    with_retries,
)

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PROBE_DIR = "_probe"
_PROBE_VERSION = 1
_FILES_PER_PROBE_TASK = 4000


@dataclass
class Inventory:
    """What discovery found: scans to ingest (work references, no content), and the inputs that
    are not scans or cannot be."""

    scans: list[dict] = field(default_factory=list)
    """{scan_id, source_id (the original id: never leaves the driver), group (the stored group
    key), kind, uri, files (DICOM), folder_id (DICOM), label (the input's name in reasons), stamp,
    mask_uri}, by original id."""
    skipped: list[dict] = field(default_factory=list)
    """{input, reason}: not an image, not axial CT, ..."""
    quarantined: list[dict] = field(default_factory=list)
    """{scan_id, input, reason}: scans refused before reading (duplicate ids, too large)."""
    ungrouped: int = 0
    """Scans that the configured `groups:` placed in no group (each is its own): a count only."""


def nifti_id(rel: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if rel.endswith(suffix):
            return rel[: -len(suffix)]
    return None


def _digest(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _rel(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path != root else posixpath.basename(path)


def discover(cfg: IngestConfig, names: Names, probe_cache: tuple) -> Inventory:
    """The inventory of `cfg.input.scans`; masks, reports and stamps are added by `attach`.
    `probe_cache` is the (filesystem, folder) where DICOM folder probes are cached."""
    fs, root = filesystem(cfg.input.scans, cfg.storage)
    if not with_retries(lambda: fs.exists(root), f"list {cfg.input.scans}", cfg.storage):
        raise ConfigError(f"input.scans {cfg.input.scans} does not exist")
    to_uri = fs.unstrip_protocol if is_remote(cfg.input.scans) else (lambda p: p)
    inv = Inventory()
    found: dict[str, dict] = {}

    def add(scan: dict) -> None:
        sid = scan["source_id"]
        if sid in found:
            scan_id = names.scan_id(sid, scan["uri"])
            label = names.label(scan["uri"], scan_id)
            inv.quarantined.append(
                {
                    "scan_id": scan_id,
                    "input": label,
                    "reason": f"{label}: duplicate scan id (also {names.label(found[sid]['uri'], scan_id)})",
                }
            )
        else:
            found[sid] = scan

    others: dict[str, list[Entry]] = {}
    for e in list_entries(fs, root, cfg.storage):
        sid = nifti_id(_rel(e.path, root))
        if sid is not None:
            add({"source_id": sid, "kind": "nifti", "uri": to_uri(e.path), "files": [], "stamps": [e.stamp]})
        else:
            others.setdefault(posixpath.dirname(e.path), []).append(e)
    for folder, probe in probe_folders(cfg, others, to_uri, probe_cache, names).items():
        folder_id, folder_uri = _rel(folder, root), to_uri(folder)
        for uri, why in probe.skipped:
            label = names.label(uri)
            inv.skipped.append({"input": label, "reason": f"{label}: {why}"})
        several = len(probe.series) + len(probe.quarantined) > 1
        for uid, _, why in probe.quarantined:
            scan_id = names.scan_id(f"{folder_id}/{uid}" if several else folder_id, folder_uri)
            label = names.label(f"{folder_uri} (series {uid})", scan_id)
            inv.quarantined.append({"scan_id": scan_id, "input": label, "reason": f"{label}: {why}"})
        stamps = {to_uri(e.path): e.stamp for e in others[folder]}
        ids = series_ids(folder_id, probe.series)
        for series in probe.series:
            add(
                {
                    "source_id": ids[series.uid],
                    "kind": "dicom",
                    "folder_id": folder_id,
                    "uri": f"{folder_uri} (series {series.uid})" if len(probe.series) > 1 else folder_uri,
                    "files": series.files,
                    "tag_group": series.group,
                    "stamps": [f"{posixpath.basename(f)}:{stamps.get(f, '')}" for f in series.files],
                }
            )
    pattern = re.compile(cfg.groups.pattern) if cfg.groups.pattern is not None else None
    for sid in sorted(found):
        scan = found[sid]
        scan["scan_id"] = names.scan_id(sid, scan["uri"])
        scan["label"] = names.label(scan["uri"], scan["scan_id"])
        group = _group(scan, pattern, names)
        inv.ungrouped += group is None and cfg.groups.configured
        scan["group"] = scan["scan_id"] if group is None else group
        inv.scans.append(scan)
    if inv.ungrouped:
        log.info("groups: %d of %d scans are in no group (each is its own)", inv.ungrouped, len(inv.scans))
    return inv


def _group(scan: dict, pattern: re.Pattern | None, names: Names) -> str | None:
    """A scan's stored group: its series' grouping tag (already pseudonymised by probe_folders),
    else the pattern's capture in its source id; None: neither (the scan is its own group)."""
    tagged = scan.pop("tag_group", None)
    if tagged:
        return tagged
    match = pattern.search(scan["source_id"]) if pattern is not None else None
    return names.group(match.group(1)) if match and match.group(1) else None


def probe_cache_location(cfg: IngestConfig, names: Names) -> tuple:
    """(filesystem, folder) of the probe cache: `_probe/` in the output, or beside the id map when
    ids are pseudonymised (a probe lists file paths, which hold the original ids)."""
    if names.pseudonymize:
        return filesystem(names.map_uri() + ".probe", cfg.storage)
    fs, root = filesystem(cfg.output.uri, cfg.storage)
    return fs, join(root, PROBE_DIR)


def probe_folders(
    cfg: IngestConfig, folders: dict[str, list[Entry]], to_uri: Callable[[str], str], cache_at: tuple, names: Names
) -> dict[str, Probe]:
    """Probe every folder holding files that are not NIfTI, in Ray tasks; a folder whose listing
    is unchanged since the last run reuses its cached result. A series' grouping tag
    (`groups.dicom`) is turned into its stored group (`Names.group`) before it is cached."""
    if not folders:
        return {}
    fs_out, cache_root = cache_at
    settings = cfg.input.dicom.model_dump_json() + str(cfg.preprocess.max_voxels)
    if cfg.groups.dicom_tag:  # cached groups are hashes under this key: another key probes again
        settings += cfg.groups.dicom + names.group("probe cache")
    stamps = {
        f: _digest(str(_PROBE_VERSION), settings, *(f"{posixpath.basename(e.path)}:{e.stamp}" for e in entries))
        for f, entries in folders.items()
    }
    cache = {
        f: join(cache_root, hashlib.sha1(f.encode("utf-8", "surrogatepass")).hexdigest() + ".json") for f in folders
    }
    blobs = read_many(fs_out, list(cache.values()), cfg.storage, missing_ok=True)
    probes = {}
    for folder, path in cache.items():
        entry = json.loads(blobs[path]) if path in blobs else {}
        if entry.get("stamp") == stamps[folder]:
            probes[folder] = _probe_from_json(entry["probe"])
    todo = [f for f in sorted(folders) if f not in probes]
    if not todo:
        return probes
    import ray

    from ctray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    batches: list[list[str]] = [[]]
    for folder in todo:
        if sum(len(folders[f]) for f in batches[-1]) >= _FILES_PER_PROBE_TASK:
            batches.append([])
        batches[-1].append(folder)
    task = ray.remote(_probe_task).options(num_cpus=1, max_retries=cfg.task_retries)
    cfg_json = cfg.model_dump_json()
    refs = [
        task.remote(cfg_json, [(f, to_uri(f), [to_uri(e.path) for e in folders[f]]) for f in batch])
        for batch in batches
    ]
    log.info("probing %d folder(s) of non-NIfTI files for DICOM series in %d task(s)", len(todo), len(refs))
    for ref in refs:
        for folder, probe_json in ray.get(ref).items():
            for series in probe_json["series"]:
                series["group"] = names.group(series["group"]) if series["group"] else None
            probes[folder] = _probe_from_json(probe_json)
            publish_bytes(
                json.dumps({"stamp": stamps[folder], "probe": probe_json}).encode(), fs_out, cache[folder], cfg.storage
            )
    return probes


def _probe_task(cfg_json: str, folders: list[tuple[str, str, list[str]]]) -> dict[str, dict]:
    """Ray task: (folder, its URI, its files' URIs) -> folder -> its probe as JSON."""
    cfg = IngestConfig.model_validate_json(cfg_json)
    private = cfg.privacy.pseudonymize_ids
    out = {}
    for folder, folder_uri, uris in folders:
        headers = []
        for uri in uris:
            fs, path = filesystem(uri, cfg.storage)
            try:
                head = with_retries(
                    partial(fs.cat_file, path, start=0, end=PREAMBLE_BYTES),
                    # A probe has no pseudonyms (the key stays with the driver): the file is not named.
                    "read a file of a DICOM folder" if private else f"read {uri}",
                    cfg.storage,
                    not private,
                )
            except FileNotFoundError:
                head = None
            headers.append((uri, head, partial(fs.open, path, "rb", block_size=1 << 16)))
        probe = probe_folder(headers, folder_uri, cfg.input.dicom, cfg.preprocess.max_voxels, cfg.groups.dicom_tag)
        out[folder] = _probe_to_json(probe)
    return out


def _probe_to_json(p: Probe) -> dict:
    return {
        "series": [
            {"uid": s.uid, "files": s.files, "rows": s.rows, "columns": s.columns, "group": s.group} for s in p.series
        ],
        "skipped": [list(s) for s in p.skipped],
        "quarantined": [list(q) for q in p.quarantined],
    }


def _probe_from_json(d: dict) -> Probe:
    return Probe(
        [Series(s["uid"], s["files"], s["rows"], s["columns"], s.get("group")) for s in d["series"]],
        [(u, w) for u, w in d["skipped"]],
        [(u, f, w) for u, f, w in d["quarantined"]],
    )


def load_table(uri: str, what: str, storage: StorageConfig) -> tuple[bytes, str]:
    fs, path = filesystem(uri, storage)
    try:
        return read_bytes(fs, path, storage), posixpath.basename(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {uri} does not exist") from None


def load_reports(cfg: IngestConfig) -> ReportTable | None:
    """The reports table, with the labels table's values merged into each report's labels."""
    if not cfg.input.reports and not cfg.input.labels:
        return None
    table = ReportTable({}, [])
    try:
        if cfg.input.reports:
            raw, name = load_table(cfg.input.reports, "input.reports", cfg.storage)
            table = parse_report_table(
                raw, name, cfg.input.report_id_column, cfg.input.report_text_columns, cfg.reports.max_chars
            )
        if cfg.input.labels:
            from ctray.ingest.reports import Report

            raw, name = load_table(cfg.input.labels, "input.labels", cfg.storage)
            labels, problems = parse_label_table(raw, name, cfg.input.labels_id_column or cfg.input.report_id_column)
            table.problems.extend(problems)
            for sid, values in labels.items():
                report = table.reports.get(sid)
                if report is None:
                    table.reports[sid] = report = Report(None, "no report for this scan in the reports table")
                report.labels = {**report.labels, **values}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return table


def discover_masks(cfg: IngestConfig) -> dict[str, Entry]:
    """Mask id (path below the masks root without suffix) -> its listing entry (URI in .path)."""
    if not cfg.input.masks:
        return {}
    fs, root = filesystem(cfg.input.masks, cfg.storage)
    to_uri = fs.unstrip_protocol if is_remote(cfg.input.masks) else (lambda p: p)
    out = {}
    for e in list_entries(fs, root, cfg.storage):
        mid = nifti_id(_rel(e.path, root))
        if mid is not None:
            out[mid] = Entry(to_uri(e.path), e.size, e.stamp)
    return out


def _candidates(scan: dict) -> list[str]:
    """Ids a scan's mask or report may be filed under: its id, its series' folder, its last part."""
    out = [scan["source_id"]]
    if scan.get("folder_id") and scan["folder_id"] != scan["source_id"]:
        out.append(scan["folder_id"])
    out.extend(posixpath.basename(c) for c in list(out))
    return list(dict.fromkeys(out))


def attach(inv: Inventory, masks: dict[str, Entry], table: ReportTable | None) -> dict[str, dict]:
    """Give each scan its mask and stamp; return scan id -> its report (text, problem, labels)."""
    reports: dict[str, dict] = {}
    for scan in inv.scans:
        keys = _candidates(scan)
        mask = next((masks[k] for k in keys if k in masks), None)
        scan["mask_uri"] = mask.path if mask else None
        report_part = ""
        if table is not None:
            rep = next((table.reports[k] for k in keys if k in table.reports), None)
            if rep is not None:
                reports[scan["scan_id"]] = {"text": rep.text, "problem": rep.problem, "labels": rep.labels}
                report_part = hashlib.sha256(
                    json.dumps(reports[scan["scan_id"]], sort_keys=True).encode("utf-8", "surrogatepass")
                ).hexdigest()
        scan["stamp"] = _digest(*scan.pop("stamps"), mask.stamp if mask else "", report_part)
    return reports
