"""The same fake multi-node cluster as test_multinode.py on Ray's autoscaler v1 (`ray up` before Ray
2.50, KubeRay with `autoscalerOptions.version: v1`): an ingest makes it add nodes, a job that no
node type can run fails in one line (v1 reports no infeasible placement group: ctray's wait for a
launch runs out), and `ctray doctor` reads v1's state."""

import json

import pytest

from helpers import REPO, ctray_cli
from multinode import (
    FakeCluster,
    NodeWatch,
    big_scans,
    doctor_flags_the_gpu_job,
    gpu_job_refused,
    ingest_overrides,
)

pytestmark = pytest.mark.slow  # every test here runs on the module's one cluster

SCANS = 8


@pytest.fixture(scope="module")
def cluster():
    with FakeCluster("v1") as c:
        yield c


@pytest.fixture(scope="module")
def shards(cluster, tmp_path_factory):
    """`ctray ingest` from a client (RAY_ADDRESS) of 8 one-scan shards, with no CPU on the head:
    the shard folder and the most worker nodes seen at once while it ran."""
    root = tmp_path_factory.mktemp("v1")
    scans = big_scans(root, SCANS)
    assert cluster.worker_nodes() == []
    watch = NodeWatch(cluster)
    done = ctray_cli(
        "ingest",
        str(REPO / "jobs" / "ingest-local.yaml"),
        *ingest_overrides(scans, root / "shards"),
        env=cluster.client_env,
        timeout=400,
    )
    peak = watch.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "shards", peak


@pytest.mark.timeout(480)
def test_v1_adds_nodes_for_an_ingest(shards):
    out, peak = shards
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] == SCANS
    assert peak >= 2  # 8 one-CPU writers queued at once on 2-CPU nodes


@pytest.mark.timeout(180)
def test_v1_a_job_no_node_type_can_run_fails_in_one_line(cluster, shards):
    why = gpu_job_refused(cluster, shards[0], schedule_timeout_s=3)
    assert why.startswith("the autoscaler launched none in 3 s"), why


@pytest.mark.timeout(180)
def test_doctor_reads_autoscaler_v1(cluster, shards, tmp_path):
    text = doctor_flags_the_gpu_job(cluster, shards[0], tmp_path)
    assert " v1; node types from the head's autoscaling config: cpu2 (2 CPU, 4 GiB memory, 0-4)" in text
