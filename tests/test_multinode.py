"""ctray on a real multi-node Ray with an autoscaler, on this machine: Ray's fake multi-node
provider (`provider: type: fake_multinode`) starts real raylets as "nodes" when the autoscaler
launches them. The head has no CPUs for work and the worker node type starts at zero, so every task,
worker and trial has to make the autoscaler add nodes, as on a cloud cluster.

Ray's own AutoscalingCluster helper cannot be used: its example config is not in the pip wheel and
it runs `ray stop --force`, which would stop every Ray on the machine. The fixture writes the config
itself, starts the head on free ports with its own temp dir, and kills only its own processes.
Everything talks to the cluster the way users do: `ctray` commands with RAY_ADDRESS, `ray job
submit`, and the dashboard's State API.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from ctray.data.phantoms import make_phantom, write_dataset, write_nifti

from conftest import PHANTOM_SHAPE, PHANTOM_SPACING, REPO, free_port

pytestmark = pytest.mark.slow  # end-to-end runs of a minute or more: the slow tier

BIN = Path(sys.executable).parent
NODE_CPUS = 2


def _config(gcs_port: int) -> dict:
    return {
        "cluster_name": "ctray-fake",
        "max_workers": 4,
        # The fake provider starts nodes against 127.0.0.1:6379 unless told the head's GCS address.
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu2": {
                "resources": {"CPU": NODE_CPUS, "object_store_memory": 300 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 4,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _processes_of(temp: str) -> list[psutil.Process]:
    """Every process of the cluster in `temp`: those naming it, and their descendants (workers)."""
    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid != os.getpid() and any(temp in a for a in (p.info["cmdline"] or []))
    ]
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return list(found.values())


class FakeCluster:
    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.port, dash = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        config = Path(self.temp) / "autoscaler.json"
        config.write_text(json.dumps(_config(self.port)))
        # RAY_ADDRESS reaches every process of the cluster (the fake nodes are the monitor's
        # children): Ray code that looks for "the" local cluster (the State API in Ray Train's
        # placement-group cleaner) would otherwise find this machine's other Rays too and give up.
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_ADDRESS": self.address,
            # Ray Data asks the autoscaler for the resources of each running dataset and renews
            # the request; a training worker that dies with its node leaves its last request to
            # expire after 180 s (and a finished one is released after as long), which would keep
            # nodes up into the next test's wait for an empty cluster.
            "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "15",
            "RAY_DATA_LOW_UTIL_REQUEST_RELEASE_DELAY_S": "5",
        }
        subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=0",
                f"--autoscaling-config={config}",
                f"--temp-dir={self.temp}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                "--disable-usage-stats",
            ],
            check=True,
            env=self.env,
            capture_output=True,
            timeout=120,
        )
        self.client_env = {k: v for k, v in self.env.items() if k != "RAY_FAKE_CLUSTER"}
        deadline = time.time() + 120
        while (
            subprocess.run(
                [str(BIN / "ray"), "job", "list", f"--address={self.dashboard}"],
                env=self.env,
                capture_output=True,
                timeout=60,
            ).returncode
            != 0
        ):
            assert time.time() < deadline, "the head's job server did not come up"
            time.sleep(2)

    def worker_nodes(self) -> list[str]:
        """Ids of the alive nodes other than the head (State API)."""
        with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100", timeout=20) as r:
            nodes = json.loads(r.read())["data"]["result"]["result"]
        return [n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]]

    def kill_node(self, node_id: str) -> int:
        """A node vanishes (a spot preemption): kill every process that belongs to it."""
        victims = []
        for p in _processes_of(self.temp):
            try:
                if p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                    victims.append(p)
            except psutil.Error:
                pass
        for p in victims:
            p.kill()
        psutil.wait_procs(victims, timeout=30)
        return len(victims)

    def stop(self) -> None:
        procs = _processes_of(self.temp)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)


class NodeWatch:
    """Polls the number of worker nodes in the background; `peak` is the most seen at once."""

    def __init__(self, cluster: FakeCluster):
        self.cluster, self.peak, self._stop = cluster, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.wait(1.0):
            try:
                self.peak = max(self.peak, len(self.cluster.worker_nodes()))
            except OSError:
                pass

    def stop(self) -> int:
        self._stop.set()
        self.thread.join(10)
        return self.peak


@pytest.fixture(scope="module")
def cluster():
    c = FakeCluster()
    try:
        yield c
    finally:
        c.stop()


def _ctray(cluster: FakeCluster, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctray.cli", *args],
        env=cluster.client_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


SCANS = 16


@pytest.fixture(scope="module")
def shards(cluster, tmp_path_factory):
    """`ctray ingest` on the cluster: 16 one-scan shards of a 150x512x512 scan (about ten seconds of
    work for this machine's cores, longer than a node takes to start), with no CPU on the head.
    Returns the shard folder, the most worker nodes seen at once while it ran, and its log."""
    root = tmp_path_factory.mktemp("multinode")
    scans = root / "scans"
    scans.mkdir()
    p = make_phantom("big", 21, shape=(150, 512, 512), spacing=(2.0, 0.7, 0.7))
    write_nifti(str(root / "big.nii.gz"), p.hu, p.affine)
    for i in range(SCANS):
        (scans / f"scan{i:02d}.nii.gz").symlink_to(root / "big.nii.gz")
    assert cluster.worker_nodes() == []
    watch = NodeWatch(cluster)
    done = _ctray(
        cluster,
        "ingest",
        "/dev/null",
        f"input.scans={scans}",
        f"output.uri={root}/shards",
        "output.scans_per_shard=1",
        "preprocess.spacing=[3,2,2]",
        "lease.settle_s=0.2",
    )
    peak = watch.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "shards", peak, done.stderr


def test_ingest_makes_the_autoscaler_add_nodes(shards):
    out, peak, log = shards
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] == SCANS
    # 16 shard tasks of 1 CPU queued at once on 2-CPU nodes: more than one node (a pool sized from
    # the CPUs present at start would have asked for one).
    assert peak >= 2, log[-2000:]


def test_pretrain_spans_two_nodes_and_resumes_after_losing_one(cluster, shards, tmp_path):
    out = shards[0]
    runs = tmp_path / "runs"
    args = [
        "pretrain",
        str(REPO / "jobs" / "ctfm-local.yaml"),
        f"data.shards={out}",
        f"run.storage={runs}",
        "run.name=spread",
        "scaling.cpus_per_worker=2",
        "scaling.placement_strategy=SPREAD",
        "objective.patches_per_scan=8",
        "data.scans_per_batch=4",
        "train.max_steps=24",
        "train.log_every=2",
        "train.checkpoint_every=8",
        "run.max_failures=2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctray.cli", *args],
        env=cluster.client_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    run = runs / "spread"
    snapshot = run / "checkpoint_manager_snapshot.json"  # Ray Train writes it once every rank reported the checkpoint
    deadline = time.time() + 400
    while (
        time.time() < deadline
        and not (snapshot.exists() and "checkpoint_00000008" in snapshot.read_text())
        and proc.poll() is None
    ):
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    workers = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"workers"' in line]
    nodes = workers[-1]["nodes"]  # the worker group that wrote the checkpoint
    assert len(set(nodes)) == 2, workers  # 2 workers of 2 CPUs on 2-CPU nodes: one node each
    checkpoints_before = sorted(p.name for p in run.glob("checkpoint_0*") if p.name in snapshot.read_text())
    assert cluster.kill_node(nodes[1]) > 0
    output, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, output[-3000:]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [m for m in log if m.get("event") == "resume"]
    assert resumes and resumes[0]["step"] == int(checkpoints_before[-1].split("_")[1]), [
        m for m in log if "event" in m
    ]  # lost <= one checkpoint interval
    later = [m for m in log if m.get("event") == "workers"][-1]["nodes"]
    assert nodes[1] not in later  # resumed on another node
    steps, losses = zip(*[(m["step"], m["loss"]) for m in log if "loss" in m], strict=False)
    assert steps[-1] == 24
    slope = np.polyfit(steps, losses, 1)[0]  # a fit over every report: steadier than first vs last few
    assert slope < 0, (slope, losses)


def test_sweep_trials_run_at_once_on_added_nodes(cluster, shards, tmp_path):
    out = shards[0]
    sweep = {
        "base": str(REPO / "jobs" / "ctfm-local.yaml"),
        "overrides": [
            f"data.shards={out}",
            "train.max_steps=4",
            "train.log_every=2",
            "train.checkpoint_every=4",
            "scaling.num_workers=1",
            "data.scans_per_batch=1",
            "scaling.cpus_per_worker=1",
        ],
        "space": {"optim.lr": {"grid": [0.002, 0.0005]}},
        "search": "grid",
        "num_samples": 1,
        "scheduler": {"kind": "fifo"},
        "name": "together",
        "storage": str(tmp_path / "sweeps"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    deadline = time.time() + 120  # from no worker node: the trials' demand is what adds them
    while cluster.worker_nodes() and time.time() < deadline:
        time.sleep(2)
    assert cluster.worker_nodes() == []
    watch = NodeWatch(cluster)
    done = _ctray(cluster, "sweep", str(path))
    peak = watch.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 trial(s) at once" in done.stderr
    spans = []  # from the trial's workers starting to its last report
    for trial in (tmp_path / "sweeps" / "together" / "trials").iterdir():
        times = [
            json.loads(line)["time"] for line in (trial / "metrics.jsonl").read_text().splitlines() if '"time"' in line
        ]
        spans.append((min(times), max(times)))
    assert len(spans) == 2
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # the two trials ran at the same time
    assert peak >= 2


def test_job_submit_of_ingest_and_pretrain_from_a_fresh_clone(cluster, tmp_path):
    """The README's way: `ray job submit --working-dir <a fresh clone>` of ingest, then pretrain.
    The jobs run the clone's ctray (an edit there takes effect without reinstalling anything on
    the cluster)."""
    clone = tmp_path / "clone"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith("tests/"):
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel, follow_symlinks=False)
    init = clone / "ctray" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "edited-'))
    write_dataset(str(tmp_path / "data"), 4, seed=9, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={cluster.dashboard}",
        "--working-dir",
        str(clone),
        "--",
        "python",
        "-m",
        "ctray.cli",
    ]
    ingest = subprocess.run(
        [
            *submit,
            "ingest",
            "jobs/ingest-local.yaml",
            f"input.scans={tmp_path}/data/scans",
            f"input.masks={tmp_path}/data/masks",
            f"input.reports={tmp_path}/data/reports.jsonl",
            f"output.uri={tmp_path}/shards",
            "preprocess.spacing=[3,2,2]",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-2000:]
    assert "ctray edited-" in ingest.stdout and "4 written" in ingest.stdout and "succeeded" in ingest.stdout
    train = subprocess.run(
        [
            *submit,
            "pretrain",
            "jobs/ctfm-local.yaml",
            f"data.shards={tmp_path}/shards",
            f"run.storage={tmp_path}/runs",
            "train.max_steps=4",
            "train.checkpoint_every=4",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-2000:]
    assert "ctray edited-" in train.stdout and "pretrain done" in train.stdout
    assert (tmp_path / "runs" / "ctfm-local" / "export" / "encoder.safetensors").exists()


def test_a_job_no_node_type_can_run_fails_in_one_line(cluster, shards):
    """A GPU per worker on a cluster whose node types have none: one line within a minute, not a
    job waiting forever (Ray's autoscaler does not report infeasible placement groups)."""
    t0 = time.time()
    done = _ctray(
        cluster,
        "pretrain",
        str(REPO / "jobs" / "ctfm-local.yaml"),
        f"data.shards={shards[0]}",
        "run.storage=/tmp/ctray-never-written",
        "scaling.use_gpu=true",
        "ray.schedule_timeout_s=15",
        timeout=120,
    )
    assert done.returncode == 2 and time.time() - t0 < 60, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "ctray: error: no node type of this cluster can run one training worker (0.5 CPU, 1 GPU): "
        "the autoscaler launched none in 15 s"
    )


def test_without_an_autoscaler_it_fails_at_once(ray_local):
    from ctray.errors import ConfigError
    from ctray.runtime import ensure_schedulable

    t0 = time.time()
    with pytest.raises(
        ConfigError,
        match=r"no node of this Ray cluster can run one training worker \(1 CPU, 8 GPU\); "
        r"its nodes offer: \{\"CPU\": 2.0\}",
    ):
        ensure_schedulable({"CPU": 1.0, "GPU": 8.0}, "training worker")
    assert time.time() - t0 < 5
    ensure_schedulable({"CPU": 2.0}, "training worker")  # fits: returns
