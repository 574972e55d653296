"""Scan groups (ingest's `groups:`) on a real local Ray: each row's `group` column from a pattern
on the source ids (CT-RATE's, as jobs/ingest.yaml sets it), and as keyed hashes with pseudonymised
ids, where no original id reaches the group column, the manifest, the records or the log. Groups
from DICOM tags: test_dicom.py."""

import json
import logging

import pytest
import yaml

from ctray.config import StorageConfig
from ctray.data.phantoms import make_phantom, write_dataset, write_nifti
from ctray.errors import ConfigError
from ctray.ingest.job import run_ingest
from ctray.ingest.privacy import Names
from ctray.ingest.shardset import ShardSet

from helpers import PHANTOM_SPACING, REPO, ingest_cfg, read_rows, shard_rows

CT_RATE = yaml.safe_load((REPO / "jobs" / "ingest.yaml").read_text())["groups"]["pattern"]
ID_CANARY = "CANARY-MRN-60c4"
SMALL = (16, 40, 40)


def test_ct_rate_names_group_the_reconstructions_of_a_patient(ray_local, tmp_path, caplog):
    """CT-RATE's names, flat (one of them a DICOM series folder) and in its nested folders: a
    patient's reconstructions share a group; a scan the pattern does not match is its own."""
    data = tmp_path / "data"
    write_dataset(str(data), 5, seed=2, shape=SMALL, spacing=PHANTOM_SPACING, dicom=1, reconstructions=2)
    (data / "scans" / "valid" / "valid_7" / "valid_7_b").mkdir(parents=True)
    for name in ("valid/valid_7/valid_7_b/valid_7_b_1", "scout_export"):
        p = make_phantom(name, 3, shape=SMALL, spacing=PHANTOM_SPACING)
        write_nifti(str(data / "scans" / f"{name}.nii.gz"), p.hu, p.affine)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="ctray"):
        result = run_ingest(ingest_cfg(data / "scans", out, f"groups.pattern='{CT_RATE}'"))
    assert result.scans == 7
    groups = {sid: row["group"] for sid, row in read_rows(out).items()}
    assert groups == {
        "train_1_a_1": "train_1",  # the DICOM series
        "train_1_a_2": "train_1",
        "train_2_a_1": "train_2",
        "train_2_a_2": "train_2",
        "train_3_a_1": "train_3",
        "valid/valid_7/valid_7_b/valid_7_b_1": "valid_7",
        "scout_export": "scout_export",
    }
    assert ShardSet.open(str(out), StorageConfig()).counts.ungrouped == 1
    assert "groups: 1 of 7 scans are in no group (each is its own)" in caplog.text


def test_pseudonymised_groups_are_keyed_hashes_of_the_patient(ray_local, tmp_path, monkeypatch, caplog):
    """With privacy.pseudonymize_ids: the same patient gives the same `g` hash, another patient
    another, an unmatched scan its own (pseudonymised) scan id; another key gives other groups.
    The patient ids (canaries in the file names) are in no row's id or group, not in the manifest,
    the commit records or the log, and the id map holds scans only (groups are not mapped back)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    names = [f"{ID_CANARY}-P1_a_1", f"{ID_CANARY}-P1_a_2", f"{ID_CANARY}-P2_a_1", f"{ID_CANARY}-solo"]
    for i, name in enumerate(names):
        p = make_phantom(name, i, shape=SMALL, spacing=PHANTOM_SPACING)
        write_nifti(str(scans / f"{name}.nii.gz"), p.hu, p.affine)
    monkeypatch.setenv("CTRAY_ID_KEY", "k" * 32)
    out = tmp_path / "out"
    cfg = ingest_cfg(scans, out, r"groups.pattern=^(.+)_[a-z]_\d+$", "privacy.pseudonymize_ids=true")
    with caplog.at_level(logging.INFO, logger="ctray"):
        run_ingest(cfg)
    keyed = Names(cfg)
    rows = {name: row for name in names for row in shard_rows(out) if row["scan_id"] == keyed.scan_id(name, "")}
    p1, p1_again, p2, solo = (rows[name]["group"] for name in names)
    assert p1 == p1_again == keyed.group(f"{ID_CANARY}-P1") and p1.startswith("g") and len(p1) == 25
    assert p2 == keyed.group(f"{ID_CANARY}-P2") != p1
    assert solo == rows[names[3]]["scan_id"] and solo.startswith("s")
    monkeypatch.setenv("CTRAY_ID_KEY", "another-key-of-32-characters-xx")
    assert Names(cfg).group(f"{ID_CANARY}-P1") not in (p1, p2)

    strings = [[v for v in row.values() if isinstance(v, str)] for row in rows.values()]
    records = [out / "manifest.json", *(out / "_commits").iterdir()]
    assert ID_CANARY not in json.dumps(strings) and not [p for p in records if ID_CANARY in p.read_text()]
    assert ID_CANARY not in caplog.text and "1 of 4 scans are in no group" in caplog.text
    id_map = [json.loads(line) for line in (tmp_path / "out.id_map.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in id_map) == sorted(row["scan_id"] for row in rows.values())


@pytest.mark.parametrize("pattern", ["no_capture", "(a)(b)", "(unclosed"])
def test_a_pattern_needs_one_capture_group(tmp_path, pattern):
    with pytest.raises(ConfigError, match=r"groups\.pattern: ") as e:
        ingest_cfg(tmp_path, tmp_path / "out", f"groups.pattern='{pattern}'")
    assert "\n" not in str(e.value)
