"""ctray on a real multi-node Ray with an autoscaler, on this machine: Ray's fake multi-node
provider (`provider: type: fake_multinode`) starts real raylets as "nodes" when the autoscaler
launches them. The head has no CPUs for work and the worker node type starts at zero, so every task,
worker and trial has to make the autoscaler add nodes, as on a cloud cluster.

Ray's own AutoscalingCluster helper cannot be used: its example config is not in the pip wheel and
it runs `ray stop --force`, which would stop every Ray on the machine. The fixture writes the config
itself, starts the head on free ports with its own temp dir, and kills only its own processes.
Everything talks to the cluster the way users do: `ray job submit --working-dir` of a fresh clone
(ingest, then a pretrain that loses a node), `ctray sweep` with RAY_ADDRESS, and the dashboard's
State API. One fake cluster serves the module: the ingest starts it from no worker node, and the
later tests find the nodes the autoscaler keeps until they have been idle for 15 s.
"""

import csv
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

import psutil
import pytest
import yaml

from ctray.config import load_config
from ctray.data.phantoms import make_phantom, write_nifti
from ctray.train.config import PretrainConfig

from conftest import BIN, REPO, RayHead, free_port, processes_of, run_log

pytestmark = pytest.mark.slow  # every test here runs on the module's one cluster

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


class FakeCluster(RayHead):
    """A head with no CPU for work and an autoscaler whose fake provider starts 2-CPU nodes (real
    raylets on this machine) when work asks for them."""

    def __init__(self):
        config = Path(tempfile.mkdtemp(prefix="rfc", dir="/tmp")) / "autoscaler.json"
        env = {
            # tests/fake_cluster/sitecustomize.py: the nodes share one disk here (see it).
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(Path(__file__).parent / "fake_cluster"), os.environ.get("PYTHONPATH")) if p
            ),
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # Ray Data asks the autoscaler for the resources of each running dataset and renews
            # the request; a training worker that dies with its node leaves its last request to
            # expire after 180 s (and a finished one is released after as long), which would keep
            # nodes up into the next test's wait for an empty cluster.
            "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "15",
            "RAY_DATA_LOW_UTIL_REQUEST_RELEASE_DELAY_S": "5",
        }
        port = free_port()
        config.write_text(json.dumps(_config(port)))
        super().__init__("--num-cpus=0", f"--autoscaling-config={config}", env=env, dashboard=True, port=port)
        self.config_dir = config.parent
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
        for p in processes_of(self.temp):
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
        super().stop()
        shutil.rmtree(self.config_dir, ignore_errors=True)


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


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository as a user checks it out (tracked and untracked files, not tests), with its
    version edited: jobs submitted with it as working dir must run this copy of ctray, not the
    installed one."""
    clone = tmp_path_factory.mktemp("clone")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file() and not rel.startswith("tests/"):
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel, follow_symlinks=False)
    init = clone / "ctray" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "edited-'))
    return clone


def _submit(cluster: FakeCluster, clone: Path, *args: str, **popen: object) -> subprocess.Popen:
    """`ray job submit --working-dir <clone> -- python -m ctray.cli -v ARGS`: the README's way; it
    follows the job's log until the job ends (-v: a failure's traceback reaches the test's output)."""
    argv = [str(BIN / "ray"), "job", "submit", f"--address={cluster.dashboard}", "--working-dir", str(clone)]
    return subprocess.Popen(
        [*argv, "--", "python", "-m", "ctray.cli", "-v", *args],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,  # type: ignore[arg-type]
    )


SCANS = 12


@pytest.fixture(scope="module")
def shards(cluster, clone, tmp_path_factory):
    """`ray job submit` of `ctray ingest` from the clone: 12 one-scan shards of a 120x400x400 scan
    (several seconds of work for this machine's cores, longer than a node takes to start), with
    no CPU on the head. Returns the shard folder, the most worker nodes seen at once while it ran,
    and the job's log."""
    root = tmp_path_factory.mktemp("multinode")
    scans = root / "scans"
    scans.mkdir()
    p = make_phantom("big", 21, shape=(120, 400, 400), spacing=(2.5, 0.9, 0.9))
    write_nifti(str(root / "big.nii.gz"), p.hu, p.affine)
    for i in range(SCANS):
        (scans / f"scan{i:02d}.nii.gz").symlink_to(root / "big.nii.gz")
    assert cluster.worker_nodes() == []
    watch = NodeWatch(cluster)
    job = _submit(
        cluster,
        clone,
        "ingest",
        "jobs/ingest-local.yaml",  # the clone's, resolved in the job's working dir
        f"input.scans={scans}",
        "input.masks=null",
        "input.reports=null",
        f"output.uri={root}/shards",
        "output.scans_per_shard=1",
        "preprocess.spacing=[3,2,2]",
        "lease.settle_s=0.2",
    )
    log, _ = job.communicate(timeout=400)
    peak = watch.stop()
    assert job.returncode == 0, log[-3000:]
    return root / "shards", peak, log


@pytest.mark.timeout(480)
def test_ingest_job_from_a_clone_makes_the_autoscaler_add_nodes(shards):
    out, peak, log = shards
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] == SCANS
    assert "ctray edited-" in log and f"{SCANS} written" in log and "succeeded" in log, log[-3000:]
    # 12 shard tasks of 1 CPU queued at once on 2-CPU nodes: more than one node (a pool sized from
    # the CPUs present at start would have asked for one).
    assert peak >= 2, log[-2000:]


@pytest.mark.timeout(480)
def test_pretrain_job_spans_two_nodes_and_resumes_after_losing_one(cluster, clone, shards, tmp_path):
    out = shards[0]
    runs = tmp_path / "runs"
    job = _submit(
        cluster,
        clone,
        "pretrain",
        "jobs/ctfm-local.yaml",
        f"data.shards={out}",
        f"run.storage={runs}",
        "run.name=spread",
        "scaling.cpus_per_worker=2",
        "scaling.placement_strategy=SPREAD",
        "deepspeed.precision=bf16",
        "train.max_steps=16",
        "train.log_every=2",
        "train.checkpoint_every=8",
        "run.max_failures=2",
    )
    run = runs / "spread"
    snapshot = run / "checkpoint_manager_snapshot.json"  # Ray Train writes it once every rank reported the checkpoint
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and not (snapshot.exists() and "checkpoint_00000008" in snapshot.read_text())
        and job.poll() is None
    ):
        time.sleep(0.5)
    assert job.poll() is None, job.stdout.read()[-3000:]
    workers = [m for m in run_log(run) if m.get("event") == "workers"]
    nodes = workers[-1]["nodes"]  # the worker group that wrote the checkpoint
    assert len(set(nodes)) == 2, workers  # 2 workers of 2 CPUs on 2-CPU nodes: one node each
    checkpoints_before = sorted(p.name for p in run.glob("checkpoint_0*") if p.name in snapshot.read_text())
    assert cluster.kill_node(nodes[1]) > 0
    output, _ = job.communicate(timeout=360)
    assert job.returncode == 0, output[-3000:]
    assert "ctray edited-" in output and "pretrain done" in output, output[-3000:]
    log = run_log(run)
    resumes = [m for m in log if m.get("event") == "resume"]
    assert resumes and resumes[0]["step"] == int(checkpoints_before[-1].split("_")[1]), [
        m for m in log if "event" in m
    ]  # lost <= one checkpoint interval
    later = [m for m in log if m.get("event") == "workers"][-1]["nodes"]
    assert nodes[1] not in later  # resumed on another node
    steps = [m["step"] for m in log if "loss" in m]
    assert steps[-1] == 16 and steps == sorted(steps)
    assert (run / "export" / "encoder.safetensors").exists()


def _trials(sweep_dir: Path) -> dict[str, dict]:
    """Tune's record of each trial (status, config) in the experiment state files."""
    out = {}
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            for entry in json.loads(state.read_text())["trial_data"]:
                trial = json.loads(entry[0])
                out[trial["trial_id"]] = trial
        except (json.JSONDecodeError, KeyError, OSError):
            pass  # written while we read; look again
    return out


def _finished(sweep_dir: Path) -> dict[float, str]:
    """lr -> trial id of the trials Tune has recorded as TERMINATED."""
    return {
        t["config"]["optim.lr"]: t["trial_id"] for t in _trials(sweep_dir).values() if t.get("status") == "TERMINATED"
    }


@pytest.mark.timeout(540)
def test_sweep_runs_trials_at_once_stops_the_poor_and_resumes(cluster, tmp_path):
    """One 4-trial grid sweep over the learning rate, two trials at a time, each trial a Ray Train
    run on the cluster's nodes: killed once ASHA has stopped a trial, then re-run.

    The order makes ASHA's decision certain: lr 2e-3 and 5e-4 (which learn) start together; lr 1e-6
    (which barely moves) starts when one of them has finished, so at its first rung it meets their
    recorded losses and is stopped, 90 steps before its end (Tune's stop takes a moment to reach a
    running trial). The last trial (lr 2e-5) starts with it and is still running at the kill. (Tune
    does not keep ASHA's rungs across a restore, so the decision is made before the kill.)"""
    sweep = {
        "base": str(REPO / "jobs" / "ctfm-local.yaml"),
        "overrides": [
            # The trials train on the objective's synthetic batch: what is tested is Tune around the
            # trainer (the data path has its own tests), and no Ray Data pipeline per trial to start.
            "data.synthetic=true",
            "train.max_steps=100",
            "train.log_every=10",
            "train.checkpoint_every=50",
            "scaling.num_workers=1",
            "data.scans_per_batch=1",
            "scaling.cpus_per_worker=1",
            "deepspeed.precision=bf16",
        ],
        "space": {"optim.lr": {"grid": [0.002, 0.0005, 0.000001, 0.00002]}},
        "search": "grid",
        "num_samples": 1,
        "scheduler": {"kind": "asha", "metric": "loss", "mode": "min", "grace_period": 1, "reduction_factor": 2},
        "name": "lr",
        "storage": str(tmp_path / "sweeps"),
        "max_concurrent": 2,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    sweep_dir = tmp_path / "sweeps" / "lr"

    # 1. a real `ctray sweep` process, killed once the poor trial has been stopped
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctray.cli", "sweep", str(path)],
        # Tune records trial states every 10 s or more; every second here, so the kill lands in time.
        env={**cluster.client_env, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 300
    while time.time() < deadline and 0.000001 not in _finished(sweep_dir) and proc.poll() is None:
        time.sleep(0.5)
    proc.kill()
    _, first_log = proc.communicate()
    assert "2 trial(s) at once" in first_log, first_log[-3000:]
    finished = _finished(sweep_dir)
    assert 0.000001 in finished and len(finished) < 4, (finished, first_log[-3000:])
    runs = sweep_dir / "trials"

    def stamps() -> dict[str, int]:
        """Every file of the finished trials' runs (a trial ASHA stopped before its first
        checkpoint holds only its config.yaml) and when it was written."""
        return {str(f): f.stat().st_mtime_ns for t in finished.values() for f in (runs / t).rglob("*") if f.is_file()}

    before = stamps()

    # 2. the same sweep again: it continues, and finished trials are not run again
    done = _ctray(cluster, "sweep", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert stamps() == before
    rows = {r["optim.lr"]: r for r in csv.DictReader((sweep_dir / "results.csv").open())}
    assert set(rows) == {"0.002", "0.0005", "1e-06", "2e-05"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["1e-06"]["stopped_early"] == "True", rows  # stopped at its first rung
    assert any(r["stopped_early"] == "False" for r in rows.values()), rows  # the first at each rung goes on
    # The first two trials ran at the same time: from Tune's records
    # of their reports, each span from the trial's start (its first report less the time it took)
    # to its last report.
    spans = []
    for lr in ("0.002", "0.0005"):
        (record,) = sweep_dir.glob(f"_trial_{rows[lr]['trial']}_*/result.json")
        reports = [json.loads(line) for line in record.read_text().splitlines()]
        spans.append((reports[0]["time"] - reports[0]["time_total_s"], reports[-1]["time"]))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans

    # 3. best.yaml is the best trial's config, and `ctray pretrain` takes it as it is
    best = min(rows.values(), key=lambda r: float(r["loss"]))
    chosen = load_config(PretrainConfig, sweep_dir / "best.yaml")
    ran = load_config(PretrainConfig, runs / best["trial"] / "config.yaml")
    assert chosen.optim.lr == float(best["optim.lr"])
    assert chosen.model_dump(exclude={"run"}) == ran.model_dump(exclude={"run"})
    assert (sweep_dir / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(180)
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
        "ray.schedule_timeout_s=8",
        timeout=120,
    )
    assert done.returncode == 2 and time.time() - t0 < 60, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "ctray: error: no node type of this cluster can run one training worker (0.5 CPU, 1 GPU): "
        "the autoscaler launched none in 8 s"
    )
