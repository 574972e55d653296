"""`ray job submit --working-dir . -- ctray ...` against a real head started by `ray start --head`
on loopback: the way users run ctray on a cluster."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PHANTOM_SHAPE, PHANTOM_SPACING, REPO, free_port

BIN = Path(sys.executable).parent


@pytest.fixture
def head():
    """A second Ray (beside the session's) with its own temp dir, so that stopping it touches
    nothing else: `ray stop` would stop every Ray on the machine."""
    import psutil

    if not (BIN / "ray").exists():
        pytest.skip("the ray CLI is not installed beside this Python")
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Every port explicit: the session's Ray runs a dashboard too, and two agents on the default
    # ports leave this head with "No available agent to submit job".
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=3",
                    f"--temp-dir={temp}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120  # the job agent comes up a little after `ray start` returns
        while subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=env, capture_output=True,
                             timeout=60).returncode != 0 and time.time() < deadline:
            time.sleep(2)
        yield address, env
    finally:
        mine = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in (p.info["cmdline"] or []))]
        for p in mine:
            p.kill()
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """`ray job submit`, tried again while the head's job agent is still starting."""
    for _ in range(10):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(3)
    return done


def test_ingest_and_pretrain_through_ray_job_submit(head, tmp_path):
    address, env = head
    from ctray.data.phantoms import write_dataset

    write_dataset(str(tmp_path / "data"), 4, seed=9, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    work = tmp_path / "checkout"
    shutil.copytree(REPO / "jobs", work / "jobs")  # the working dir that `ray job submit` uploads
    submit = [str(BIN / "ray"), "job", "submit", f"--address={address}", "--working-dir", str(work), "--"]
    ingest = _submit(
        [*submit, "ctray", "ingest", "jobs/ingest-local.yaml", f"input.scans={tmp_path}/data/scans", "input.masks=null",
         "input.reports=null", f"output.uri={tmp_path}/shards", "preprocess.spacing=[3,2,2]"], env,
    )
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-2000:]
    assert "ingest done" in ingest.stdout and "succeeded" in ingest.stdout
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["counts"]["scans"] == 4
    train = _submit(
        [*submit, "ctray", "pretrain", "jobs/ctfm-local.yaml", f"data.shards={tmp_path}/shards",
         f"run.storage={tmp_path}/runs", "train.max_steps=4", "train.checkpoint_every=4"], env,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-2000:]
    assert "pretrain done" in train.stdout and (tmp_path / "runs" / "ctfm-local" / "export" / "encoder.safetensors").exists()
