"""ctray on a real multi-node Ray with Ray's default autoscaler (v2) on this machine: the fake
multi-node provider of tests/multinode.py, whose head offers no CPU for work and whose worker node
type starts at zero. Everything talks to the cluster the way users do: `ray job submit
--working-dir` of a fresh clone (ingest, then a pretrain that loses a node), `ctray sweep` with
RAY_ADDRESS, `ctray doctor`, and the dashboard's State API. One fake cluster serves the module: the
ingest starts it from no worker node, and the later tests find the nodes the autoscaler keeps until
they have been idle for 15 s. (test_multinode_v1.py: the same on autoscaler v1.)
"""

import csv
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ctray.config import load_config
from ctray.train.config import PretrainConfig

from helpers import CTRAY_CLI, REPO, ctray_cli, read_metrics
from multinode import (
    FakeCluster,
    NodeWatch,
    big_scans,
    doctor_flags_the_gpu_job,
    gpu_job_refused,
    ingest_overrides,
    make_clone,
    submit,
)

pytestmark = pytest.mark.slow  # every test here runs on the module's one cluster


@pytest.fixture(scope="module")
def cluster():
    with FakeCluster("v2") as c:
        yield c


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return make_clone(tmp_path_factory.mktemp("clone"))


SCANS = 8


@pytest.fixture(scope="module")
def shards(cluster, clone, tmp_path_factory):
    """`ray job submit` of `ctray ingest` from the clone: 8 one-scan shards (multinode.big_scans), with
    no CPU on the head. Returns the shard folder, the most worker nodes seen at once while it ran,
    and the job's log."""
    root = tmp_path_factory.mktemp("multinode")
    scans = big_scans(root, SCANS)
    assert cluster.worker_nodes() == []
    watch = NodeWatch(cluster)
    job = submit(
        cluster,
        clone,
        "ingest",
        "jobs/ingest-local.yaml",  # the clone's, resolved in the job's working dir
        *ingest_overrides(scans, root / "shards"),
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
    # 8 shard tasks of 1 CPU queued at once on 2-CPU nodes: more than one node (a pool sized from
    # the CPUs present at start would have asked for one).
    assert peak >= 2, log[-2000:]


@pytest.mark.timeout(480)
def test_pretrain_job_spans_two_nodes_and_resumes_after_losing_one(cluster, clone, shards, tmp_path):
    out = shards[0]
    runs = tmp_path / "runs"
    job = submit(
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
    workers = read_metrics(run, "workers")
    nodes = workers[-1]["nodes"]  # the worker group that wrote the checkpoint
    assert len(set(nodes)) == 2, workers  # 2 workers of 2 CPUs on 2-CPU nodes: one node each
    checkpoints_before = sorted(p.name for p in run.glob("checkpoint_0*") if p.name in snapshot.read_text())
    assert cluster.kill_node(nodes[1]) > 0
    output, _ = job.communicate(timeout=360)
    assert job.returncode == 0, output[-3000:]
    assert "ctray edited-" in output and "pretrain done" in output, output[-3000:]
    resumes, events = read_metrics(run, "resume"), read_metrics(run, "events")
    # lost <= one checkpoint interval
    assert resumes and resumes[0]["step"] == int(checkpoints_before[-1].split("_")[1]), events
    later = read_metrics(run, "workers")[-1]["nodes"]
    assert nodes[1] not in later  # resumed on another node
    steps = [m["step"] for m in read_metrics(run, "steps")]
    assert steps[-1] == 16 and steps == sorted(steps)
    assert (run / "export" / "encoder" / "model.safetensors").exists()


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
    recorded losses and is stopped, 50 steps before its end (Tune's stop takes a moment to reach a
    running trial). The last trial (lr 2e-5) starts with it and is still running at the kill. (Tune
    does not keep ASHA's rungs across a restore, so the decision is made before the kill.)"""
    sweep = {
        "base": str(REPO / "jobs" / "ctfm-local.yaml"),
        "overrides": [
            # The trials train on the objective's synthetic batch: what is tested is Tune around the
            # trainer (the data path has its own tests), and no Ray Data pipeline per trial to start.
            "data.synthetic=true",
            "train.max_steps=60",
            "train.log_every=10",
            "train.checkpoint_every=30",
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
    # A process, not ctray_cli: it is killed mid-sweep.
    proc = subprocess.Popen(
        [*CTRAY_CLI, "sweep", str(path)],
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
    ctray_cli("sweep", str(path), env=cluster.client_env, timeout=600, check=True)
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
    """A GPU per worker on a cluster whose node types have none: one line as soon as autoscaler v2
    reports the request infeasible, well before the job's schedule timeout (300 s)."""
    why = gpu_job_refused(cluster, shards[0], schedule_timeout_s=300)
    assert why.startswith("the autoscaler reports the request infeasible"), why


@pytest.mark.timeout(180)
def test_doctor_reads_autoscaler_v2_and_its_node_types(cluster, shards, tmp_path):
    text = doctor_flags_the_gpu_job(cluster, shards[0], tmp_path)
    assert " v2; node types from the head's autoscaling config: cpu2 (2 CPU, 4 GiB memory, 0-4)" in text
    assert "pretrain training worker (x2) (0.5 CPU)" in text and "storage " + str(shards[0]) + ": reachable" in text
    assert "versions " in text and "no GPU on the running nodes" in text
