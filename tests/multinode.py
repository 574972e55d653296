"""Ray's fake multi-node provider (`provider: type: fake_multinode`) as the multi-node tests use it:
it starts real raylets as "nodes" on this machine when the autoscaler launches them. The head has
no CPUs for work and the worker node type starts at zero, so every task, worker and trial has to
make the autoscaler add nodes, as on a cloud cluster. Autoscaler v2 (the default of `ray up` and
KubeRay since Ray 2.50) is test_multinode.py's; v1 is test_multinode_v1.py's.

Ray's own AutoscalingCluster helper cannot be used: its example config is not in the pip wheel and
it runs `ray stop --force`, which would stop every Ray on the machine. FakeCluster writes the config
itself, starts the head on free ports with its own temp dir, and kills only its own processes."""

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

from helpers import BIN, REPO, RayHead, ctray_cli, free_port, processes_of

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
"""The node id the fake provider gives the head (ray.autoscaler._private.fake_multi_node)."""

NODE_CPUS = 2
NODE_MEMORY = 4 * 2**30


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
            # One node per instance asked for: without it the provider starts one node for a
            # request of several, and autoscaler v2 waits for the others (v1 asks one at a time).
            "launch_multiple": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu2": {
                # memory: as a cloud node type states it (the launcher fills it in on AWS), and
                # what ingest writers and sweep trials are packed by.
                "resources": {"CPU": NODE_CPUS, "memory": NODE_MEMORY, "object_store_memory": 300 * 2**20},
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


_HEAD_ONLY = ("RAY_FAKE_CLUSTER", "RAY_enable_autoscaler_v2", "RAY_CLOUD_INSTANCE_ID", "RAY_NODE_TYPE_NAME")


class FakeCluster(RayHead):
    """A head with no CPU for work and an autoscaler (v2 or v1) whose fake provider starts 2-CPU
    nodes (real raylets on this machine) when work asks for them."""

    def __init__(self, autoscaler: str):
        config = Path(tempfile.mkdtemp(prefix="rfc", dir="/tmp")) / "autoscaler.json"
        env = {
            # tests/fake_cluster/sitecustomize.py: the nodes share one disk here (see it).
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(Path(__file__).parent / "fake_cluster"), os.environ.get("PYTHONPATH")) if p
            ),
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1" if autoscaler == "v2" else "0",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            # Ray Data asks the autoscaler for the resources of each running dataset and renews
            # the request; a training worker that dies with its node leaves its last request to
            # expire after 180 s (and a finished one is released after as long), which would keep
            # nodes up into the next test's wait for an empty cluster.
            "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "15",
            "RAY_DATA_LOW_UTIL_REQUEST_RELEASE_DELAY_S": "5",
        }
        if autoscaler == "v2":
            # v2 matches Ray nodes to the provider's instances by their cloud instance id, which
            # the fake provider sets for the nodes it starts; the head is started here.
            env |= {"RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_NODE_TYPE_NAME": "ray.head.default"}
        port = free_port()
        config.write_text(json.dumps(_config(port)))
        super().__init__("--num-cpus=0", f"--autoscaling-config={config}", env=env, dashboard=True, port=port)
        self.config_dir = config.parent
        # A client (a laptop's `ctray`) has none of the head's own settings.
        self.client_env = {k: v for k, v in self.env.items() if k not in _HEAD_ONLY}
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

    def __enter__(self) -> "FakeCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


def make_clone(clone: Path) -> Path:
    """The repository as a user checks it out (tracked and untracked files, not tests), with its
    version edited: jobs submitted with it as working dir must run this copy of ctray, not the
    installed one."""
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


def submit(cluster: FakeCluster, clone: Path, *args: str, **popen: object) -> subprocess.Popen:
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


def ingest_overrides(scans: Path, out: Path) -> list[str]:
    """jobs/ingest-local.yaml on `scans` alone (no masks, no reports), one scan per shard: each its
    own writer task. Each writer asks for the memory of a 2^25-voxel scan, which the phantoms of
    big_scans are."""
    return [
        f"input.scans={scans}",
        "input.masks=null",
        "input.reports=null",
        f"output.uri={out}",
        "output.scans_per_shard=1",
        "preprocess.spacing=[3,2,2]",
        f"preprocess.max_voxels={2**25}",
        "lease.settle_s=0.2",
    ]


def big_scans(root: Path, n: int) -> Path:
    """A folder of `n` copies (links) of one 144x384x384 phantom, a few seconds of an ingest writer's
    work each on this machine's cores: queued at once, they are demand for several nodes, which
    both autoscalers launch together. (At 96x320x320 ingest with ISA-L's inflate could finish all
    eight on the first node before v1 launched a second.)"""
    from ctray.data.phantoms import make_phantom, write_nifti

    scans = root / "scans"
    scans.mkdir()
    p = make_phantom("big", 21, shape=(144, 384, 384), spacing=(2.5, 0.9, 0.9))
    write_nifti(str(root / "big.nii.gz"), p.hu, p.affine)
    for i in range(n):
        (scans / f"scan{i:02d}.nii.gz").symlink_to(root / "big.nii.gz")
    return scans


def doctor_flags_the_gpu_job(cluster: FakeCluster, shards: Path, tmp_path: Path) -> str:
    """`ctray doctor` with a CPU pretrain job on `shards` and the same asking a GPU per worker: all
    is fine but the GPU job's workers, which fit no node type (one `!!` line, exit status 2).
    Returns the `ok` lines."""
    jobs = []
    for name, gpu in (("cpu", False), ("gpu", True)):
        job = yaml.safe_load((REPO / "jobs" / "ctfm-local.yaml").read_text())
        job["data"]["shards"] = str(shards)
        job["run"]["storage"] = str(tmp_path / "runs")
        job["scaling"]["use_gpu"] = gpu
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))
        jobs.append(str(tmp_path / f"{name}.yaml"))
    done = ctray_cli("doctor", cluster.address, *jobs, env=cluster.client_env, timeout=150)
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    fine = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    others = [line for line in done.stdout.splitlines() if not line.startswith("ok ")]
    assert len(others) == 1, done.stdout  # the GPU job's line alone (a loaded CI run once printed another)
    (bad,) = others
    assert bad.startswith("!!") and "training worker (x2) (0.5 CPU, 1 GPU): fits no node type" in bad, done.stdout
    assert done.stderr.strip().splitlines()[-1] == "ctray: error: 1 problem(s) a job would meet, marked !! above"
    return "\n".join(fine)


def gpu_job_refused(cluster: FakeCluster, shards: Path, schedule_timeout_s: float) -> str:
    """`ctray pretrain` asking a GPU per worker of a cluster that has none: it must exit 2 within a
    minute with one line naming the request; returns the reason that line gives."""
    t0 = time.time()
    done = ctray_cli(
        "pretrain",
        str(REPO / "jobs" / "ctfm-local.yaml"),
        f"data.shards={shards}",
        "run.storage=/tmp/ctray-never-written",
        "scaling.use_gpu=true",
        f"ray.schedule_timeout_s={schedule_timeout_s}",
        env=cluster.client_env,
        timeout=120,
    )
    assert done.returncode == 2 and time.time() - t0 < 60, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    refused = "ctray: error: no node type of this cluster can run one training worker (0.5 CPU, 1 GPU): "
    assert last.startswith(refused), last
    return last.removeprefix(refused)
