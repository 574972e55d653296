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


def _sweep(tmp_path: Path, name: str, lrs: list[float], train: str, *overrides: str, **settings) -> Path:
    """A `ctray sweep` YAML over the learning rate of the local CT-FM job: short trials (`train`:
    "max_steps/log_every/checkpoint_every") on the objective's synthetic batch, one worker each. The trials train on the
    synthetic batch because what is tested is Tune around the trainer (the data path has its own
    tests), with no Ray Data pipeline per trial to start."""
    steps, log_every, checkpoint_every = train.split("/")
    sweep = {
        "base": str(REPO / "jobs" / "ctfm-local.yaml"),
        "overrides": [
            "data.synthetic=true",
            f"train.max_steps={steps}",
            f"train.log_every={log_every}",
            f"train.checkpoint_every={checkpoint_every}",
            "scaling.num_workers=1",
            "data.scans_per_batch=1",
            "scaling.cpus_per_worker=1",
            "deepspeed.precision=bf16",
            *overrides,
        ],
        "space": {"optim.lr": {"grid": lrs}},
        "search": "grid",
        "num_samples": 1,
        "name": name,
        "storage": str(tmp_path / "sweeps"),
        **settings,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _results(sweep_dir: Path) -> dict[str, dict]:
    """results.csv by learning rate."""
    return {r["optim.lr"]: r for r in csv.DictReader((sweep_dir / "results.csv").open())}


@pytest.mark.timeout(300)
def test_sweep_runs_trials_at_once_and_stops_the_poor(cluster, tmp_path):
    """A 3-trial grid over the learning rate, two trials at a time, each a Ray Train run on the
    cluster's nodes, under ASHA. lr 2e-3 and 5e-4 start together; lr 1e-6 starts when one of them
    has ended, so at its first rung (step 10) it meets their records and ASHA stops it.

    ASHA ranks the trials by the learning rate they report (mode max): on 60 steps of the synthetic
    batch every trial's loss sits at chance level (ln 7 for 8 views), so a decision by loss would be
    noise. Ranked by the schedule's own rate, which trial is poor is known in advance; what is
    tested is everything around the decision: the stop reaching a running Ray Train run, the table,
    best.yaml."""
    path = _sweep(
        tmp_path,
        "lr",
        [0.002, 0.0005, 0.000001],
        "60/10/30",
        "optim.min_lr_ratio=1.0",  # the rate stays at its peak: the last report ranks the trials too (best.yaml)
        scheduler={"kind": "asha", "metric": "lr", "mode": "max", "grace_period": 1, "reduction_factor": 2},
        report_metrics=["loss"],
        max_concurrent=2,
    )
    sweep_dir = tmp_path / "sweeps" / "lr"
    out = ctray_cli("sweep", str(path), env=cluster.client_env, timeout=280, check=True)
    assert "2 trial(s) at once" in out.stderr, out.stderr[-3000:]
    rows = _results(sweep_dir)
    assert set(rows) == {"0.002", "0.0005", "1e-06"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["1e-06"]["stopped_early"] == "True" and rows["1e-06"]["reports"] == "1", rows
    # Logs at 10..60 and a checkpoint at 30: 6 reports, all made by the best at every rung.
    assert rows["0.002"]["stopped_early"] == "False" and rows["0.002"]["reports"] == "6", rows
    # The first two ran at the same time: from Tune's records of their reports, each span from the
    # trial's start (its first report less the time it took) to its last report.
    spans = []
    for lr in ("0.002", "0.0005"):
        (record,) = sweep_dir.glob(f"_trial_{rows[lr]['trial']}_*/result.json")
        reports = [json.loads(line) for line in record.read_text().splitlines()]
        spans.append((reports[0]["time"] - reports[0]["time_total_s"], reports[-1]["time"]))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans

    # best.yaml is the best trial's config, and `ctray pretrain` takes it as it is
    assert all(float(r["loss"]) > 0 for r in rows.values()), rows  # report_metrics reach the table
    chosen = load_config(PretrainConfig, sweep_dir / "best.yaml")
    ran = load_config(PretrainConfig, sweep_dir / "trials" / rows["0.002"]["trial"] / "config.yaml")
    assert chosen.optim.lr == 0.002
    assert chosen.model_dump(exclude={"run"}) == ran.model_dump(exclude={"run"})
    assert (sweep_dir / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(400)
def test_a_killed_sweep_continues_keeping_finished_trials(cluster, tmp_path):
    """Two trials one after the other (FIFO, so nothing but the kill ends a trial early): the
    `ctray sweep` process is killed once the first has ended and the second has checkpointed at
    step 100. A step takes ~20 ms here, so the 300 steps left give the kill seconds to land while
    the trial runs. Run again, the sweep keeps the first as it is and the second resumes its own
    run from that checkpoint."""
    path = _sweep(tmp_path, "resume", [0.002, 0.0005], "400/50/100", scheduler={"kind": "fifo"}, max_concurrent=1)
    sweep_dir = tmp_path / "sweeps" / "resume"
    runs = sweep_dir / "trials"

    def reported_steps(lr: float) -> list[int]:
        """The steps a trial has reported to Tune (its result.json, written as each report arrives)."""
        trial = {t["config"]["optim.lr"]: t["trial_id"] for t in _trials(sweep_dir).values()}.get(lr)
        out = []
        for record in sweep_dir.glob(f"_trial_{trial}_*/result.json") if trial else []:
            out += [json.loads(line)["step"] for line in record.read_text().splitlines() if line.strip()]
        return out

    # 1. a real `ctray sweep` process (not ctray_cli: it is killed mid-sweep)
    proc = subprocess.Popen(
        [*CTRAY_CLI, "sweep", str(path)],
        # Tune records trial states every 10 s or more; every second here, so the first trial's end is on record.
        env={**cluster.client_env, "TUNE_GLOBAL_CHECKPOINT_S": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and max(reported_steps(0.0005), default=0) < 100:
        time.sleep(0.2)
    proc.kill()
    _, first_log = proc.communicate()
    finished = _finished(sweep_dir)
    assert list(finished) == [0.002] and 100 <= max(reported_steps(0.0005), default=0) < 400, (
        finished,
        reported_steps(0.0005),
        first_log[-3000:],
    )

    def stamps() -> dict[str, int]:
        """Every file of the finished trial's run and when it was written."""
        return {str(f): f.stat().st_mtime_ns for f in (runs / finished[0.002]).rglob("*") if f.is_file()}

    before = stamps()

    # 2. the same sweep again: it continues, and the finished trial is not run again
    ctray_cli("sweep", str(path), env=cluster.client_env, timeout=300, check=True)
    assert stamps() == before
    rows = _results(sweep_dir)
    assert set(rows) == {"0.002", "0.0005"} and all(r["status"] == "ok" and r["step"] == "400" for r in rows.values())
    (resume,) = read_metrics(runs / rows["0.0005"]["trial"], "resume")
    assert 100 <= resume["step"] < 400, resume


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
