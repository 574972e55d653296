"""Fixtures and hooks: one real local Ray, a Ray head of the tests' own, a real S3 API (moto server
over HTTP on 127.0.0.1), a real MLflow tracking server, phantom data sets, and the real CT/reports in
../shared/data (skipped when absent). What the tests share besides is helpers.py's.

Tests live in tier folders, whose name is their marker (`pytest -m unit`): unit/ (pure functions,
seconds each), integration/ (a real local Ray, the S3 and MLflow servers, DeepSpeed engines, rank
processes), e2e/ (whole `ctray` jobs as processes, the fake multi-node clusters). One pytest run
holds every tier, in that order, and within each the tests marked `slow` (a Ray Train run, a sweep,
a cluster) after the quick ones; the servers the selected tests need start in the background as
soon as collection ends, so they come up while the quick tests run."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ctray.data.phantoms import write_dataset

from helpers import PHANTOM_SHAPE, PHANTOM_SPACING, SHARED_DATA, RayHead, Server, ingest_cfg, servers

# Before any Ray starts, so its workers inherit them: the moto server accepts any credentials.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Torch's JIT extensions (DeepSpeed's ops) build in this run's own folder: a build killed in an
# earlier run cannot leave a lock that this run waits on, and nothing the tests build reaches the
# user's ~/.cache (ctray compiles no op: ctray.train.engine).
_EXTENSIONS = tempfile.mkdtemp(prefix="ctray-test-extensions-")
os.environ["TORCH_EXTENSIONS_DIR"] = _EXTENSIONS
atexit.register(shutil.rmtree, _EXTENSIONS, True)
# Ray Train's controller polls its workers every 2 s: a run's start and end each wait up to a few
# polls. A shorter poll changes nothing but how soon a test's run is seen to have finished.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "e2e")
"""The tier folders under tests/, in the order a run takes them; each folder's name is its marker."""


def _tier(item: pytest.Item) -> int:
    """The index in TIERS of the folder under tests/ that holds the item's module; len(TIERS) for
    a module outside tests/ (a path given on the command line)."""
    path = Path(item.path).resolve()
    if not path.is_relative_to(TESTS):
        return len(TIERS)
    folder = path.relative_to(TESTS).parts[0]
    if folder not in TIERS:
        raise pytest.UsageError(f"{path.relative_to(TESTS.parent)} is in no tier folder of tests/ {TIERS}")
    return TIERS.index(folder)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the markers added here
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test marked with its tier folder's name; the tiers in order, and in each the slow tests
    last (a stable sort keeps each module's order)."""
    tiers = {item.nodeid: _tier(item) for item in items}
    for item in items:
        if tiers[item.nodeid] < len(TIERS):
            item.add_marker(TIERS[tiers[item.nodeid]])
    items.sort(key=lambda item: (tiers[item.nodeid], item.get_closest_marker("slow") is not None))


SERVERS: dict[str, Server] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """The servers the selected tests use (after `-m` and `-k`), started now, in the background."""
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for fixture, server in servers().items():
        if fixture in wanted:
            SERVERS[fixture] = server.start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for server in SERVERS.values():
        server.stop()


def _server(fixture: str) -> str:
    if fixture not in SERVERS:  # collected by another route (e.g. a test run by its node id)
        SERVERS[fixture] = servers()[fixture].start()
    return SERVERS[fixture].url()


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


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """The moto S3 server's URL."""
    return _server("s3_endpoint")


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    """The MLflow tracking server's URL."""
    return _server("mlflow_server")


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


@pytest.fixture(scope="session")
def ray_head():
    """A Ray head of the tests' own (2 CPUs), for `ctray` commands run as processes: they join it
    (RAY_ADDRESS in `ray_head.env`) instead of each starting a local Ray; its session logs are the
    tests' to search (test_phi.py)."""
    head = RayHead("--num-cpus=2")
    yield head
    head.stop()
