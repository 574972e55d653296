"""Safe resumed ingest: a crash's leftovers, changed inputs, `ctray verify` and `ctray purge`, on a
real local Ray. The output's lease against a second `ctray ingest` process: e2e/test_ingest_cli.py."""

import json
import shutil
from pathlib import Path

from ctray.config import StorageConfig
from ctray.data.phantoms import make_phantom, write_dataset, write_nifti
from ctray.ingest.job import run_ingest
from ctray.ingest.maintain import purge
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


def test_purge_removes_a_scan_everywhere(ray_local, tmp_path):
    data, out, cfg = _ingested(tmp_path, 4, seed=2)
    purge(str(out), StorageConfig(), ["phantom0001"])
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
