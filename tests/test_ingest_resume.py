"""Safe concurrent and resumed ingest: the output's lease, a crash's leftovers, changed inputs,
`ctray verify` and `ctray purge`, on a real local Ray and real `ctray ingest` processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ctray.config import StorageConfig
from ctray.data.phantoms import make_phantom, write_dataset, write_nifti
from ctray.ingest.job import run_ingest
from ctray.ingest.lease import LEASE, LeaseHeld
from ctray.ingest.maintain import purge
from ctray.ingest.records import verify

from conftest import PHANTOM_SHAPE, PHANTOM_SPACING, ingest_cfg


def _rows(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [
        r
        for s in manifest["shards"]
        for r in pq.read_table(out / s["path"], columns=["scan_id", "content_hash"]).to_pylist()
    ]


@pytest.mark.timeout(180)
def test_a_second_ingest_refuses_and_a_dead_holders_lease_is_taken_over(ray_local, ray_head, tmp_path):
    data = tmp_path / "data"
    write_dataset(str(data), 8, seed=4, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "ctray.cli",
        "ingest",
        "/dev/null",
        f"input.scans={data}/scans",
        f"output.uri={out}",
        "output.scans_per_shard=1",
        "concurrency=1",
        "preprocess.spacing=[3,2,2]",
        "lease.settle_s=0.2",
    ]
    first = subprocess.Popen(
        cmd,
        env=ray_head.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    commits = out / "_commits"
    deadline = time.time() + 120
    while time.time() < deadline and not (commits.exists() and any(commits.glob("*.json"))):
        time.sleep(0.05)
    cfg = ingest_cfg(data / "scans", out, "output.scans_per_shard=1")
    with pytest.raises(
        LeaseHeld, match=rf"is being written by another ingest on {socket.gethostname()} pid {first.pid} "
    ):
        run_ingest(cfg)
    os.killpg(first.pid, signal.SIGKILL)  # the first one dies holding its lease, mid-job
    first.wait()
    time.sleep(2)  # Ray ends its job's workers
    assert (out / LEASE).exists()
    result = run_ingest(cfg)  # its process is gone: the lease is taken over without waiting for it to expire
    assert result.scans == 8 and not (out / LEASE).exists()
    ids = [r["scan_id"] for r in _rows(out)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8  # no scan in two shards
    assert verify(str(out), StorageConfig()) == []  # no commit pointing at a missing shard

    # A holder on another machine is only taken over once its lease expires.
    (out / LEASE).write_text(
        json.dumps(
            {
                "token": "t",
                "holder": "ingest on node-7 pid 42",
                "host": "node-7",
                "pid": 42,
                "started": time.time(),
                "expires": time.time() + 4,
                "expires_at": "soon",
            }
        )
    )
    with pytest.raises(LeaseHeld, match="ingest on node-7 pid 42"):
        run_ingest(cfg)
    time.sleep(4.5)
    assert run_ingest(cfg).scans == 8


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
