"""Shared fixtures: one real local Ray, a real S3 API (moto server over HTTP on 127.0.0.1),
phantom data sets, and the real CT/reports in ../shared/data (skipped when absent)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ctray.config import load_config
from ctray.data.phantoms import write_dataset
from ctray.ingest.config import IngestConfig

# Before any Ray starts, so its workers inherit them: the moto server accepts any credentials.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

LOCAL_JOBS = {
    "ctfm_simclr": "ctfm-local.yaml",
    "totalfm_mae": "totalfm-mae-local.yaml",
    "totalfm_clip": "totalfm-clip-local.yaml",
    "cagcl": "cagcl-local.yaml",
}
"""Every registered objective's tiny local job."""


def tiny_task(name: str, *overrides: str):
    """The objective's task as its local job builds it, without shards: a tokenizer trained on one
    sentence, every anatomy on label 1, no stage-1 hand-off."""
    from ctray.data.text import train_wordpiece
    from ctray.objectives import get_objective
    from ctray.train.config import PretrainConfig

    extra = ["objective.init_from=null"] if name == "totalfm_clip" else []
    cfg = load_config(PretrainConfig, REPO / "jobs" / LOCAL_JOBS[name], [*extra, *overrides])
    assets = {
        "tokenizer_json": train_wordpiece([["the liver is normal"]] * 6, 64, 1),
        "init_from": None,
        "anatomy_labels": {a: [1] for a in getattr(cfg.objective, "anatomies", [])},
    }
    return get_objective(name).task(cfg.objective, assets), cfg, assets


# Small phantoms keep the suite fast; geometry is resolution independent.
PHANTOM_SHAPE = (32, 80, 80)
PHANTOM_SPACING = (3.0, 4.0, 4.0)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # The dashboard serves the State API, through which Ray Train's PlacementGroupCleaner sees a
    # stopped run (a trial ended by ASHA); without it the run's placement group is never freed.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_dataset(str(out), 6, seed=1, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, dicom=1)
    return out


def ingest_cfg(scans, out, *overrides: str, masks=None, reports=None) -> IngestConfig:
    items = [
        f"input.scans={scans}",
        f"output.uri={out}",
        "output.scans_per_shard=2",
        "preprocess.spacing=[3,2,2]",
        "lease.settle_s=0.2",
    ]
    if masks:
        items.append(f"input.masks={masks}")
    if reports:
        items.append(f"input.reports={reports}")
    return load_config(IngestConfig, None, items + list(overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback: real HTTP, real botocore/s3fs client code."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ct" / "example_ct_sm.nii.gz").exists():
        pytest.skip(f"real CT data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def train_shards(ray_local, tmp_path_factory) -> Path:
    """12 phantoms ingested to local shards, for the training and sweep tests."""
    from ctray.ingest.job import run_ingest

    root = tmp_path_factory.mktemp("train")
    write_dataset(str(root / "data"), 12, seed=11, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    run_ingest(ingest_cfg(root / "data" / "scans", root / "shards", "output.scans_per_shard=4"))
    return root / "shards"


class Relay:
    """A TCP relay on 127.0.0.1 in front of the moto server that can be cut (storage going down
    mid-job: new connections refused, open ones closed) while the server keeps its data."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.up = True
        self.target = target_port
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.open.clear()

    def restore(self) -> None:
        self.up = True

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
