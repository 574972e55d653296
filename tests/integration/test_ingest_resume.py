"""Safe resumed ingest: a crash's leftovers, changed inputs, `ctray verify` and `ctray purge`, on a
real local Ray. The output's lease against a second `ctray ingest` process: e2e/test_ingest_cli.py."""

import hashlib
import hmac
import json
import shutil
from pathlib import Path

from ctray.config import StorageConfig
from ctray.data.phantoms import make_phantom, write_dataset, write_nifti
from ctray.ingest.job import Purged, read_purged, run_ingest
from ctray.ingest.maintain import purge
from ctray.ingest.privacy import Names
from ctray.ingest.records import verify

from helpers import PHANTOM_SHAPE, PHANTOM_SPACING, ingest_cfg, shard_rows


def _rows(out: Path) -> list[dict]:
    return shard_rows(out, ["scan_id", "content_hash"])


def _ingested(tmp_path: Path, n: int, seed: int):
    """n phantoms ingested two per shard: (data folder, output, the config)."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(str(data), n, seed=seed, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    cfg = ingest_cfg(data / "scans", out, "output.scans_per_shard=2")
    run_ingest(cfg)
    return data, out, cfg


def test_leftovers_of_a_crash_changed_inputs_and_verify(ray_local, tmp_path):
    data, out, cfg = _ingested(tmp_path, 6, seed=8)
    before = {r["scan_id"]: r["content_hash"] for r in _rows(out)}

    # A writer that died between publishing its shard and committing it leaves a shard no record names.
    shutil.copy(next((out / "shards").iterdir()), out / "shards" / "part-00deadbeef00dead.parquet")
    # A changed input (a corrected export) is re-ingested and replaces its row.
    other = make_phantom("phantom0004", 99, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    write_nifti(str(data / "scans" / "phantom0004.nii.gz"), other.hu, other.affine)
    result = run_ingest(cfg)
    assert result.scans == 6 and not (out / "shards" / "part-00deadbeef00dead.parquet").exists()
    after = {r["scan_id"]: r["content_hash"] for r in _rows(out)}
    assert len(_rows(out)) == 6 and set(after) == set(before)
    assert after["phantom0004"] != before["phantom0004"]
    assert {k: v for k, v in after.items() if k != "phantom0004"} == {
        k: v for k, v in before.items() if k != "phantom0004"
    }
    assert verify(str(out), StorageConfig()) == []

    # verify finds a damaged shard and a committed shard that is gone
    shards = sorted((out / "shards").iterdir())
    blob = bytearray(shards[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shards[0].write_bytes(bytes(blob))
    shards[1].unlink()
    problems = verify(str(out), StorageConfig())
    assert any(f"{shards[0].name}: " in p and "the commit record says" in p for p in problems), problems
    assert any(f"{shards[1].name}: committed but missing" in p for p in problems), problems


def _sha256(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def test_purge_removes_a_scan_everywhere(ray_local, tmp_path):
    data, out, cfg = _ingested(tmp_path, 4, seed=2)
    hashes = {r["scan_id"]: r["content_hash"] for r in _rows(out)}
    assert hashes == {sid: _sha256(data / "scans" / f"{sid}.nii.gz").hex() for sid in hashes}  # not pseudonymised
    purge(str(out), StorageConfig(), ["phantom0001"])
    assert json.loads((out / "purged.json").read_text()) == {
        "scan_ids": ["phantom0001"],
        "content_hashes": [hashes["phantom0001"]],
    }
    assert sorted(r["scan_id"] for r in _rows(out)) == ["phantom0000", "phantom0002", "phantom0003"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "phantom0001" not in {w["scan_id"] for w in manifest["written"]} and manifest["purged"] == ["phantom0001"]
    assert verify(str(out), StorageConfig()) == []
    result = run_ingest(cfg)  # the input is still there: it is not taken again
    assert result.scans == 3
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [s["reason"] for s in skipped if "phantom0001" in s["input"]] == [
        f"{data}/scans/phantom0001.nii.gz: removed by `ctray purge`; not ingested again"
    ]
    # purged.json as ctray wrote it before content hashes: a list of ids, still read
    (out / "purged.json").write_text('["phantom0001"]')
    assert read_purged(str(out), StorageConfig()) == Purged(("phantom0001",))


def test_a_purged_scan_copied_under_another_name_is_not_ingested_again(ray_local, tmp_path, monkeypatch):
    """Pseudonymised, content hashes are HMACs under a key derived from the id key (a plain sha256
    of the PACS files would link rows to them without the key). A purge records the scan's content
    hash: its file copied under a new name (so a new id) is quarantined by the writer, in one line
    naming it by pseudonym only."""
    key = "key-A-0123456789abcdef"
    monkeypatch.setenv("CTRAY_ID_KEY", key)
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(str(data), 3, seed=5, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    cfg = ingest_cfg(data / "scans", out, "privacy.pseudonymize_ids=true")
    assert run_ingest(cfg).scans == 3
    names = Names(cfg)
    content_key = names.content_key()
    assert key not in repr(content_key) and content_key.value not in repr(content_key) + str(content_key)
    derived = hmac.new(key.encode(), b"ctray content hash", hashlib.sha256).digest()
    assert content_key.value == derived.hex()  # the id key itself never travels to the writers
    hashes = {r["scan_id"]: r["content_hash"] for r in _rows(out)}
    for i in range(3):
        sha = _sha256(data / "scans" / f"phantom000{i}.nii.gz")
        stored = hashes[names.scan_id(f"phantom000{i}", "")]
        assert stored != sha.hex() and sha.hex() not in stored
        assert stored == "hmac-sha256:" + hmac.new(derived, sha, hashlib.sha256).hexdigest()

    purge(str(out), StorageConfig(), ["phantom0001"])
    purged_id = names.scan_id("phantom0001", "")
    assert read_purged(str(out), StorageConfig()) == Purged((purged_id,), (hashes[purged_id],))
    shutil.copy(data / "scans" / "phantom0001.nii.gz", data / "scans" / "renamed-copy.nii.gz")
    result = run_ingest(cfg)
    assert (result.scans, result.quarantined, result.skipped) == (2, 1, 1)
    assert sorted(r["scan_id"] for r in _rows(out)) == sorted(set(hashes) - {purged_id})
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    copy = names.scan_id("renamed-copy", "")
    assert manifest["quarantine"] == [
        {
            "scan_id": copy,
            "input": f"scan {copy}",
            "reason": f"scan {copy}: same content as a scan removed by `ctray purge`; not ingested again",
        }
    ]
    assert [s["input"] for s in manifest["skipped"]] == [f"scan {purged_id}"]
    assert manifest["counts"]["inputs"] == 4 and manifest["counts"]["written"] == 2
    assert "renamed" not in text and "phantom" not in text


def test_an_unreadable_commit_record_stops_ingest_and_purge_and_verify_deletes_nothing(ray_local, tmp_path):
    """A commit record cut short (a bad copy, a disk fault) leaves its shard unaccounted for. Once,
    verify said "re-run `ctray ingest`" and that run deleted the shard as an uncommitted leftover.
    Now verify names the record and its shard with advice that deletes nothing unaccounted for, and
    ingest and purge stop in one line before touching a file."""
    import pytest

    from ctray.errors import ConfigError

    _, out, cfg = _ingested(tmp_path, 4, seed=3)
    record = sorted((out / "_commits").glob("*.json"))[0]
    shard = out / "shards" / f"{record.stem}.parquet"
    whole = record.read_bytes()
    record.write_bytes(whole[:100])
    files = {p: p.read_bytes() for p in (out / "shards").iterdir()}

    problems = verify(str(out), StorageConfig())
    assert problems == [
        f"1 commit record(s) in {out}/_commits are not readable JSON ({record.name}), so the shards they name "
        f"(shards/{shard.name}) cannot be told from leftovers: restore the records from a copy (a versioned bucket, "
        "a backup); or delete each such record together with its shard, whose scans the next `ctray ingest` then "
        "writes again"
    ]
    for attempt in (lambda: run_ingest(cfg), lambda: purge(str(out), StorageConfig(), ["phantom0001"])):
        with pytest.raises(ConfigError, match=r"^(ingest|purge) stopped: 1 commit record\(s\) in ") as e:
            attempt()
        assert "\n" not in str(e.value)
        assert {p: p.read_bytes() for p in (out / "shards").iterdir()} == files  # every shard kept, unchanged

    record.write_bytes(whole)  # restored from a copy: whole again
    assert verify(str(out), StorageConfig()) == []


def test_another_pseudonymisation_key_is_refused_and_brings_nothing_back(ray_local, tmp_path, monkeypatch):
    """Key A writes 3 scans, one is purged; key B would give every scan a second pseudonym (all
    written again, the purged one back). The output holds key A's check value: B is refused in one
    line before anything is written, and a purge with B's pseudonyms is refused too."""
    import pytest

    from ctray.errors import ConfigError

    monkeypatch.setenv("CTRAY_ID_KEY", "key-A-0123456789abcdef")
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(str(data), 3, seed=4, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    cfg = ingest_cfg(data / "scans", out, "privacy.pseudonymize_ids=true")
    assert run_ingest(cfg).scans == 3
    check = json.loads((out / "key-check.json").read_text())["key_check"]
    assert "key-A" not in check and len(check) == 16
    purge(str(out), StorageConfig(), ["phantom0001"])  # an original id, turned into its pseudonym with key A
    before = sorted(r["scan_id"] for r in _rows(out))
    assert len(before) == 2

    monkeypatch.setenv("CTRAY_ID_KEY", "key-B-0123456789abcdef")
    with pytest.raises(ConfigError, match=r"^\$CTRAY_ID_KEY is not the key .* was pseudonymised with") as e:
        run_ingest(cfg)
    assert "\n" not in str(e.value) and "key-B" not in str(e.value) and "key-A" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^\$CTRAY_ID_KEY is not the key"):
        purge(str(out), StorageConfig(), ["phantom0002"])
    assert sorted(r["scan_id"] for r in _rows(out)) == before

    monkeypatch.setenv("CTRAY_ID_KEY", "key-A-0123456789abcdef")
    assert run_ingest(cfg).scans == 2  # the right key: the purged scan stays out
    assert sorted(r["scan_id"] for r in _rows(out)) == before
    assert (tmp_path / "out.id_map.jsonl").stat().st_mode & 0o777 == 0o600  # the map back: its owner's alone


def test_id_map_updates_of_two_ingests_at_once_keep_both(tmp_path):
    """Outputs sharing one id map (privacy.id_map) merge into it under its own lease: two writers
    at once, each adding its entries in turns, lose none of the other's."""
    import threading

    from ctray.ingest.privacy import read_id_map, update_id_map

    cfgs = [
        ingest_cfg(tmp_path, tmp_path / f"out{i}", f"privacy.id_map={tmp_path}/shared.jsonl", "lease.settle_s=0.05")
        for i in range(2)
    ]

    def add(i: int) -> None:
        for n in range(3):
            update_id_map(cfgs[i], lambda e, i=i, n=n: {**e, f"s{i}{n}": {"id": f"s{i}{n}", "source_id": None}})

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(read_id_map(cfgs[0])) == [f"s{i}{n}" for i in range(2) for n in range(3)]
