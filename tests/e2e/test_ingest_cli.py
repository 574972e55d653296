"""`ctray ingest` processes on a Ray head of the tests' own, killed mid-job as a machine or a user
would: a re-run finishes what the killed one left, without loss or a scan twice, and a second ingest
into the same output is refused while the first holds it, then takes over once its holder is gone.
A scan that kills its writer process is quarantined by its label while its shard-mates are
committed. (Ingest in the test's own process: integration/test_ingest.py and test_ingest_resume.py.)"""

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from ctray.config import StorageConfig
from ctray.data.phantoms import write_dataset
from ctray.ingest.job import run_ingest
from ctray.ingest.lease import LEASE, LeaseHeld
from ctray.ingest.records import verify

from helpers import (
    CTRAY_CLI,
    PHANTOM_SHAPE,
    PHANTOM_SPACING,
    REPO,
    RayHead,
    ctray_cli,
    ingest_cfg,
    read_rows,
    shard_rows,
)


@pytest.mark.timeout(240)
def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, ray_head):
    """Kill a real `ctray ingest` process (the job's driver) after its first commits: Ray ends the
    job's tasks with it, mid-shard; the re-run finishes the rest."""
    data = tmp_path / "data"
    n = 12
    write_dataset(str(data), n, seed=3, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    out = tmp_path / "shards"
    args = ingest_args(data, out)
    env = ray_head.env
    # A process of its own session, not ctray_cli: it is killed with its group mid-job.
    proc = subprocess.Popen(
        [*CTRAY_CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    commits = out / "_commits"
    deadline = time.time() + 180
    while time.time() < deadline and not (commits.exists() and len(list(commits.glob("*.json"))) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, mid-shard
    proc.wait()
    # Ray ends the dead job's workers a moment later; one may still commit a shard.
    stable, last = 0, -1
    while stable < 10:
        count = len(list(commits.glob("*.json")))
        stable, last = (stable + 1, count) if count == last else (0, count)
        time.sleep(0.2)
    first = {p.name: p.read_bytes() for p in (out / "shards").iterdir() if p.suffix == ".parquet"}
    committed = {p.stem for p in commits.glob("*.json")}
    assert 2 <= len(committed) < n, "the run was not interrupted midway"

    done = ctray_cli(*args, env=env, timeout=300, check=True)
    assert f"{len(committed)} committed and unchanged" in done.stderr
    rows = read_rows(out)
    assert sorted(rows) == [f"phantom{i:04d}" for i in range(n)]
    for name, blob in first.items():  # committed shards are untouched
        if name[:-8] in committed:
            assert (out / "shards" / name).read_bytes() == blob
    assert not [p for p in (out / "shards").iterdir() if ".tmp-" in p.name]


@pytest.mark.timeout(180)
def test_a_second_ingest_refuses_and_a_dead_holders_lease_is_taken_over(ray_local, ray_head, tmp_path):
    data = tmp_path / "data"
    write_dataset(str(data), 8, seed=4, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    out = tmp_path / "out"
    args = ingest_args(data, out, "lease.settle_s=0.2")
    # A process of its own session, not ctray_cli: it holds the lease while this test runs, then is killed.
    first = subprocess.Popen(
        [*CTRAY_CLI, *args],
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
    ids = [r["scan_id"] for r in shard_rows(out, ["scan_id"])]
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


@pytest.mark.timeout(300)
def test_a_scan_that_kills_its_writer_is_quarantined_by_label_and_its_shard_mates_committed(tmp_path):
    """One scan of a 3-scan shard kills its writer process each time it is loaded: with SIGKILL, as
    the kernel's OOM killer ends a process, injected into the workers of a Ray head of the test's
    own (tests/worker_death/sitecustomize.py) because a real out-of-memory kill cannot be made safely
    here. After its retry the shard is split and its scans retried one by one: the other two are
    committed, the killer is quarantined under its pseudonym, nothing fails whole. A re-run writes
    nothing new and quarantines the killer again, alone in its shard: no split."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(str(data), 3, seed=5, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    hook = {"PYTHONPATH": f"{REPO / 'tests' / 'worker_death'}:{os.environ.get('PYTHONPATH', '')}"}
    head = RayHead("--num-cpus=2", env={**hook, "CTRAY_TEST_KILL_ON": "phantom0001"})
    env = {**head.env, "CTRAY_ID_KEY": "key-0123456789abcdef"}
    args = ingest_args(
        data, out, "output.scans_per_shard=3", "task_retries=1", "privacy.pseudonymize_ids=true", "lease.settle_s=0.2"
    )
    try:
        first = ctray_cli(*args, env=env, timeout=200, check=True)
        shards = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
        again = ctray_cli(*args, env=env, timeout=200, check=True)
    finally:
        head.stop()

    ids = {e["source_id"]: e["id"] for e in map(json.loads, (tmp_path / "out.id_map.jsonl").read_text().splitlines())}
    killer = f"scan {ids['phantom0001']}"
    assert re.search(
        r"shard part-\w+: worker died; retrying its 3 scans one by one to find the one that kills it", first.stderr
    )
    assert "[3/3 shards, 3/3 scans" in first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(w["scan_id"] for w in manifest["written"]) == sorted([ids["phantom0000"], ids["phantom0002"]])
    assert [s["scans"] for s in manifest["shards"]] == [1, 1] and len(shards) == 2
    reason = (
        f"{killer}: its shard writer died 2 time(s) while writing it (WorkerCrashedError: out of memory, a crash or"
        " a lost node); give the writers more memory (task_memory_gb) or leave the input out"
    )
    assert manifest["quarantine"] == [{"scan_id": ids["phantom0001"], "input": killer, "reason": reason}]
    assert manifest["failed"] == [] and "phantom0001" not in json.dumps(manifest)  # named by its pseudonym only
    assert verify(str(out), StorageConfig()) == []

    assert "2 committed and unchanged" in again.stderr and "retrying its" not in again.stderr
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == shards
    assert json.loads((out / "manifest.json").read_text())["quarantine"] == manifest["quarantine"]


def ingest_args(data, out, *overrides: str) -> list[str]:
    """`ctray ingest` of the phantoms in `data` to `out`, one scan per shard, one writer at a time."""
    return [
        "ingest",
        "/dev/null",
        f"input.scans={data}/scans",
        f"output.uri={out}",
        "output.scans_per_shard=1",
        "concurrency=1",
        "preprocess.spacing=[3,2,2]",
        *overrides,
    ]
