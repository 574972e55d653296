"""ShardSet (ctray.ingest.shardset), the one reader of a shard set's manifest.json: what it reads from
a real ingest, the writer's manifest read back unchanged, the anatomy label ids CA-GCL takes from
it, and one clear line for a manifest that is missing, not JSON or of another schema version.
CommitRecord, the format of _commits/<shard>.json: the writer's records read back unchanged, and
read_records reading them typed."""

import dataclasses
import json
import logging
import shlex
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ingest_cfg

import ctray
from ctray.anatomy import anatomy_label_ids
from ctray.cli import build_parser
from ctray.config import StorageConfig, load_config
from ctray.config_show import command_config
from ctray.errors import ConfigError
from ctray.ingest.job import run_ingest
from ctray.ingest.records import build_manifest, read_records, verify
from ctray.ingest.schema import SCHEMA_VERSION
from ctray.ingest.shards import preprocess_fingerprint
from ctray.ingest.shardset import (
    COMMITS_DIR,
    MANIFEST,
    CommitRecord,
    CommittedScan,
    QuarantinedScan,
    ScanRow,
    ShardSet,
    ShardStats,
    Written,
)
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.objectives.cagcl.recipe import anatomy_labels

STORAGE = StorageConfig()


@pytest.fixture(scope="module")
def ingested(ray_local, phantom_dir, tmp_path_factory):
    """6 phantoms with masks and reports, ingested 2 per shard: (config, shard set folder)."""
    out = tmp_path_factory.mktemp("shardset") / "shards"
    cfg = ingest_cfg(phantom_dir / "scans", out, masks=phantom_dir / "masks", reports=phantom_dir / "reports.jsonl")
    run_ingest(cfg)
    return cfg, out


def _copy_manifest(src: Path, dst: Path, edit=None) -> str:
    """A shard set folder `dst` holding only `src`'s manifest, edited by `edit(dict)`."""
    manifest = json.loads((src / MANIFEST).read_text())
    if edit:
        edit(manifest)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return str(dst)


def _one_line_error(uri: str) -> str:
    with pytest.raises(ConfigError) as e:
        ShardSet.open(uri, STORAGE)
    message = str(e.value)
    assert "\n" not in message and uri in message
    return message


def test_open_reads_an_ingested_shard_set(ingested):
    cfg, out = ingested
    shard_set = ShardSet.open(str(out), STORAGE)
    assert (shard_set.uri, shard_set.schema_version) == (str(out), SCHEMA_VERSION)
    assert shard_set.fingerprint == preprocess_fingerprint(cfg)
    assert shard_set.preprocess.spacing == (3.0, 2.0, 2.0) and shard_set.preprocess.orientation == "SPL"
    assert shard_set.ingest.output.scans_per_shard == 2
    assert shard_set.scan_count == 6 and len(shard_set.shards) == 3
    assert {w.scan_id for w in shard_set.written} == {f"phantom{i:04d}" for i in range(6)}
    assert not shard_set.quarantine and not shard_set.skipped and not shard_set.failed and not shard_set.purged
    assert all(s.stats.rows == s.scans == 2 and s.stats.with_label_map == 2 for s in shard_set.shards)
    counts = shard_set.counts
    assert (counts.inputs, counts.scans, counts.shards) == (6, 6, 3)
    assert counts.bytes == sum((out / s.path).stat().st_size for s in shard_set.shards)

    # scans(): each committed scan once, at its shard's row group, in manifest order
    scans = shard_set.scans()
    first = str(out / shard_set.shards[0].path)
    assert scans[:2] == [ScanRow(first, 0), ScanRow(first, 1)]
    ids = [pq.ParquetFile(s.path).read_row_group(s.row_group, columns=["scan_id"])["scan_id"][0].as_py() for s in scans]
    assert sorted(ids) == sorted(w.scan_id for w in shard_set.written)
    assert shard_set.shard_paths() == [str(out / s.path) for s in shard_set.shards]


def test_the_writers_manifest_reads_back_unchanged(ingested):
    """Ingest publishes ShardSet.to_json(); reading it and writing it again gives the same text,
    in the on-disk format readers of earlier ctray versions expect (no schema change)."""
    _, out = ingested
    text = (out / MANIFEST).read_text()
    shard_set = ShardSet.open(str(out), STORAGE)
    assert shard_set.to_json() == text
    assert ShardSet.from_json(shard_set.to_json(), str(out), STORAGE) == shard_set
    manifest = json.loads(text)
    assert list(manifest) == [
        "schema_version",
        "ctray_version",
        "created_at",
        "fingerprint",
        "config",
        "counts",
        "shards",
        "written",
        "quarantine",
        "skipped",
        "failed",
        "purged",
    ]
    assert list(manifest["counts"]) == [
        "inputs",
        "written",
        "quarantined",
        "skipped",
        "failed",
        "scans",
        "shards",
        "bytes",
        "llm_fallbacks",
        "ungrouped",
    ]
    assert list(manifest["shards"][0]) == ["path", "shard", "scans", "sha256", "bytes", "stats"]
    assert manifest["config"]["output"]["uri"] == str(out)


def test_cagcl_takes_its_label_ids_from_the_shard_set(ingested, tmp_path):
    cfg, out = ingested
    shard_set = ShardSet.open(str(out), STORAGE)
    assert shard_set.anatomies == anatomy_label_ids(cfg.preprocess.anatomies)
    recipe = CAGCLConfig(anatomies=["lung", "heart"])
    assert anatomy_labels(recipe, str(out), STORAGE) == {a: shard_set.anatomies[a] for a in ("lung", "heart")}

    # shards ingested with other anatomy groups: CA-GCL reads those, not ctray's defaults
    groups = {"lung": ["lung_upper_lobe_left", "lung_lower_lobe_left"], "heart": ["heart"]}
    other = dataclasses.replace(
        shard_set, ingest=cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"anatomies": groups})})
    )
    (tmp_path / MANIFEST).write_text(other.to_json())
    assert anatomy_labels(recipe, str(tmp_path), STORAGE) == {"lung": [10, 11], "heart": [51]}
    with pytest.raises(ConfigError, match="not anatomy groups of the shards"):
        anatomy_labels(CAGCLConfig(anatomies=["liver"]), str(tmp_path), STORAGE)


def test_a_folder_without_a_manifest_says_to_ingest_first(tmp_path):
    assert _one_line_error(str(tmp_path)) == f"{tmp_path} has no manifest.json; run `ctray ingest` first"


def test_a_manifest_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / MANIFEST).write_text('{"schema_version": 2, "shards": [')
    assert "is not valid JSON" in _one_line_error(str(tmp_path))
    (tmp_path / MANIFEST).write_text("[]")
    assert "is not a ctray manifest" in _one_line_error(str(tmp_path))


def test_shards_of_another_schema_version_are_refused(ingested, tmp_path):
    """A v3 shard set (its manifest says so) is refused in one line saying what changed and the
    command that writes it again, which `ctray ingest` parses into that set's config with a new
    output; `ctray verify` reports the same line. A newer set names the ctray that wrote it."""
    cfg, out = ingested
    uri = _copy_manifest(out, tmp_path / "old", lambda m: m.update(schema_version=3))
    shutil.copy(out / "ingest-config.yaml", tmp_path / "old" / "ingest-config.yaml")
    message = _one_line_error(uri)
    assert message == (
        f"{uri} holds shards of schema v3; this ctray reads v4 (v4: content_hash keyed when pseudonymising;"
        " SeriesInstanceUIDs never in ids when pseudonymising): re-ingest with"
        f" `ctray ingest {uri}/ingest-config.yaml output.uri=<a new folder>`"
    )
    assert verify(uri, STORAGE) == [message]
    command = message.split("`")[1].replace("<a new folder>", str(tmp_path / "new"))
    args = build_parser().parse_args(shlex.split(command)[1:])
    again = load_config(command_config(args.command), args.config, args.overrides)
    assert again.output.uri == str(tmp_path / "new")
    assert again.model_dump(exclude={"output"}) == cfg.model_dump(exclude={"output"})

    uri = _copy_manifest(out, tmp_path / "newer", lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    assert _one_line_error(uri) == (
        f"{uri} holds shards of schema v{SCHEMA_VERSION + 1}; this ctray reads v{SCHEMA_VERSION}: read it with the"
        f" ctray that wrote it ({ctray.__version__}) or a later one"
    )


def test_a_manifest_missing_an_entry_or_with_a_bad_config_is_one_line(ingested, tmp_path):
    _, out = ingested
    uri = _copy_manifest(out, tmp_path / "cut", lambda m: m.pop("written"))
    assert "is not a ctray manifest (no 'written' key)" in _one_line_error(uri)
    uri = _copy_manifest(out, tmp_path / "config", lambda m: m["config"]["preprocess"].update(spacing=[0, 1, 1]))
    assert "config.preprocess.spacing" in _one_line_error(uri)


def test_a_shard_set_without_scans_opens_but_has_none_to_read(ingested, tmp_path):
    """`ctray verify` and `ctray purge` read an empty set; a reader that needs scans gets a clear error."""
    _, out = ingested
    uri = _copy_manifest(out, tmp_path / "empty", lambda m: m.update(shards=[], written=[]))
    shard_set = ShardSet.open(uri, STORAGE)
    assert shard_set.scan_count == 0 and shard_set.counts.inputs == 0
    with pytest.raises(ConfigError, match="the manifest lists no scans"):
        shard_set.scans()
    with pytest.raises(ConfigError, match="the manifest lists no scans"):
        shard_set.shard_paths()


COMMIT_KEYS = [
    "shard",
    "path",
    "sha256",
    "bytes",
    "scans",
    "quarantine",
    "supersedes",
    "stats",
    "parsers",
    "fingerprint",
    "schema_version",
    "ctray_version",
    "committed_at",
    "seconds",
]
STATS_KEYS = ("rows", "voxels", "bytes", "hu_min", "hu_max", "with_label_map", "with_anatomy_texts", "anatomies")


def _round_trip(text: str) -> str:
    return json.dumps(CommitRecord.from_json(json.loads(text)).to_json())


def test_the_writers_commit_records_read_back_unchanged(ingested):
    """Shard writers publish CommitRecord.to_json(); reading a record and writing it again gives the
    same text, keys in the order of the records ctray has always written."""
    cfg, out = ingested
    paths = sorted((out / COMMITS_DIR).glob("*.json"))
    assert len(paths) == 3
    for path in paths:
        text = path.read_text()
        assert _round_trip(text) == text
        d = json.loads(text)
        assert list(d) == COMMIT_KEYS
        assert [list(s) for s in d["scans"]] == [["scan_id", "input", "stamp", "content_hash"]] * 2
        assert list(d["stats"]) == [*STATS_KEYS]
        record = CommitRecord.from_json(d)
        assert record.path == f"shards/{record.shard}.parquet" and path.name == f"{record.shard}.json"
        assert record.record_path == f"{COMMITS_DIR}/{path.name}"
        assert record.bytes == record.stats.bytes == (out / record.path).stat().st_size
        assert record.fingerprint == preprocess_fingerprint(cfg) and record.rewritten is None
        assert (record.schema_version, record.ctray_version) == (SCHEMA_VERSION, ctray.__version__)
        assert record.parsers == {"rules": 2} and not record.quarantine and not record.supersedes


def test_records_without_a_file_or_rewritten_read_back_unchanged():
    """The keys a real ingest above does not write: a shard whose every input was quarantined (no
    file: path and sha256 null), a rewritten shard (supersedes and, last, rewritten)."""
    started = time.time() - 2
    empty = CommitRecord.new(
        shard="part-00000000000000aa",
        fingerprint="f" * 16,
        scans=[],
        quarantine=[QuarantinedScan("s1", "/data/s1.nii.gz", "/data/s1.nii.gz: not a readable NIfTI file", "ab")],
        stats=ShardStats(0, 0, 0, None, None, 0, 0, {}),
        sha256=None,
        started=started,
    )
    assert (empty.path, empty.sha256, empty.bytes, empty.parsers, empty.shard_entry()) == (None, None, 0, {}, None)
    assert 2 <= empty.seconds < 60 and abs(empty.committed_at - time.time()) < 60
    d = empty.to_json()
    assert list(d) == COMMIT_KEYS and list(d["quarantine"][0]) == ["scan_id", "input", "reason", "stamp"]
    text = json.dumps(d)
    assert _round_trip(text) == text and CommitRecord.from_json(json.loads(text)) == empty

    rewritten = CommitRecord.new(
        shard="part-00000000000000bb",
        fingerprint="f" * 16,
        scans=[CommittedScan("s2", "/data/s2.nii.gz", "cd", "0" * 64)],
        quarantine=[],
        stats=ShardStats(1, 8, 100, -1024, 30, 1, 0, {"lung": 1}),
        sha256="1" * 64,
        started=started,
        parsers={"rules": 1},
        supersedes=["part-00000000000000cc"],
        rewritten="purged",
    )
    d = rewritten.to_json()
    assert list(d) == [*COMMIT_KEYS, "rewritten"] and d["supersedes"] == ["part-00000000000000cc"]
    assert (d["path"], d["bytes"], d["rewritten"]) == ("shards/part-00000000000000bb.parquet", 100, "purged")
    text = json.dumps(d)
    assert _round_trip(text) == text and CommitRecord.from_json(json.loads(text)) == rewritten


def test_read_records_gives_the_typed_records(ingested):
    _, out = ingested
    records = read_records(str(out), STORAGE)
    on_disk = [CommitRecord.from_json(json.loads(p.read_text())) for p in (out / COMMITS_DIR).glob("*.json")]
    assert records.live == sorted(on_disk, key=lambda r: r.committed_at) and not records.superseded
    committed = records.committed
    assert sorted(committed) == [f"phantom{i:04d}" for i in range(6)]
    entry, record = committed["phantom0003"]
    assert isinstance(entry, CommittedScan) and entry.scan_id == "phantom0003" and entry in record.scans
    assert records.holding(["phantom0003", "nobody"]) == [(record, {"phantom0003"})]

    # the manifest ingest wrote is the one built from the typed records
    shard_set = ShardSet.open(str(out), STORAGE)
    assert Written("phantom0003", entry.input, record.shard) in shard_set.written
    built = build_manifest(str(out), STORAGE, shard_set.ingest, shard_set.fingerprint, records, [], [], [], [])
    assert dataclasses.replace(built, created_at=shard_set.created_at) == shard_set


def test_a_cut_commit_record_is_ignored_and_a_foreign_one_is_one_line(ingested, tmp_path, caplog):
    """A record that is not JSON (cut short) is left out with a warning, as ever: its shard is not
    committed. A JSON file that is no commit record stops the reader with one line."""
    _, out = ingested
    copy = tmp_path / "copy"
    shutil.copytree(out / COMMITS_DIR, copy / COMMITS_DIR)
    cut = sorted((copy / COMMITS_DIR).glob("*.json"))[0]
    cut.write_text(cut.read_text()[:100])
    with caplog.at_level(logging.WARNING, logger="ctray.ingest.records"):
        records = read_records(str(copy), STORAGE)
    assert f"ignoring an unreadable commit record {cut.name}" in caplog.text
    assert len(records.live) == 2 and cut.stem not in {r.shard for r in records.live}

    cut.write_text(json.dumps({"shard": cut.stem, "scan_ids": []}))
    with pytest.raises(ConfigError) as e:
        read_records(str(copy), STORAGE)
    assert str(e.value) == (
        f"{copy}/{COMMITS_DIR}/{cut.name} is not a commit record of this ctray (no 'path' key); ingest into a"
        " new output.uri"
    )
