"""What the tests share that is not a fixture: paths, the tiny configs, the phantom geometry, the
`ctray` command as a process, a run's metrics.jsonl, shard rows, exports, rank processes of one
torch.distributed group, a Ray head and an S3 relay of the tests' own, and the test servers.

Every test module imports from here (the `pythonpath` of pytest's ini puts tests/ on sys.path);
conftest.py holds only fixtures and hooks, and no test module imports another. The fake multi-node
clusters are tests/multinode.py's."""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from ctray.config import load_config
from ctray.ingest.config import IngestConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# Small phantoms keep the suite fast; geometry is resolution independent.
PHANTOM_SHAPE = (32, 80, 80)
PHANTOM_SPACING = (3.0, 4.0, 4.0)


def efa_plugin(dockerfile: str) -> str:
    """Where cluster/Dockerfile links the aws-ofi-nccl plugin: off the library path, so NCCL loads it
    only where NCCL_NET_PLUGIN names this path (cluster/aws.yaml, cluster/kuberay/raycluster.yaml)."""
    match = re.search(r'ln -s "\$\{plugin\}" (\S+);', dockerfile)
    assert match, "cluster/Dockerfile does not link the aws-ofi-nccl plugin"
    return match.group(1)


# --- configs ---

LOCAL_JOBS = {
    "ctfm_simclr": "ctfm-local.yaml",
    "totalfm_mae": "totalfm-mae-local.yaml",
    "totalfm_clip": "totalfm-clip-local.yaml",
    "cagcl": "cagcl-local.yaml",
}
"""Every registered objective's tiny local job."""


def tiny_task(name: str, *overrides: str):
    """The objective's task as its local job builds it, without shards: a tokenizer trained on one
    sentence, the default anatomy groups' label ids (the synthetic batches'), no stage-1 hand-off."""
    from ctray.anatomy import CLASS_IDS, DEFAULT_ANATOMIES
    from ctray.data.text import train_wordpiece
    from ctray.objectives import get_objective
    from ctray.objectives.config import Assets
    from ctray.train.config import PretrainConfig

    extra = ["objective.init_from=null"] if name == "totalfm_clip" else []
    cfg = load_config(PretrainConfig, REPO / "jobs" / LOCAL_JOBS[name], [*extra, *overrides])
    groups = {a: [CLASS_IDS[c] for c in DEFAULT_ANATOMIES[a]] for a in getattr(cfg.objective, "anatomies", [])}
    assets = Assets(tokenizer_json=train_wordpiece([["the liver is normal"]] * 6, 64, 1), anatomy_labels=groups)
    return get_objective(name).task(cfg.objective, assets), cfg, assets


TINY = [
    "objective.name=ctfm_simclr",
    "objective.patches_per_scan=4",
    "objective.patch_size=[8,32,32]",
    "objective.init_filters=4",
    "objective.blocks_down=[1,1,1]",
    "objective.head_dims=[16,8]",
    "data.scans_per_batch=2",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
    "optim.lr=0.002",
    "optim.warmup_steps=2",
    "deepspeed.precision=bf16",
]
"""A CT-FM run small enough for this machine: 2 workers of a 3-level encoder on 8x32x32 patches, in
bf16 as on GPUs (autocast; the CPU's bf16 matmuls and convolutions)."""


def pretrain_cfg(shards, storage, name, *overrides):
    from ctray.train.config import PretrainConfig

    return load_config(
        PretrainConfig, None, [*TINY, f"data.shards={shards}", f"run.storage={storage}", f"run.name={name}", *overrides]
    )


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


# --- secrets and trackers ---

CANARY_USER, CANARY_PASSWORD = "canaryuser", "canary-password-4821"
CANARY_ENV = "canary-env-token-9137"
"""A secret reaching a config through ${CTRAY_TEST_TOKEN} (a secret-named variable)."""


def tracking_overrides(uri: str, name: str) -> list[str]:
    """Every logger on (TensorBoard, MLflow at `uri`, W&B offline), and a storage endpoint holding
    canary credentials (not contacted by runs on local folders)."""
    return [
        f"storage.endpoint_url=http://{CANARY_USER}:{CANARY_PASSWORD}@127.0.0.1:9",
        "run.loggers=[tensorboard, mlflow, wandb]",
        f"run.mlflow.tracking_uri={uri}",
        f"run.mlflow.experiment=exp-{name}",
        "run.wandb.mode=offline",
    ]


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: a ':W&B' header, then LevelDB's log format (32 KiB blocks of
    checksum, length, type chunks); W&B's Python reader of it went with its Go core."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


# --- what runs and ingests leave ---


def read_metrics(run: str | Path, kind: str | None = None, *, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The lines of a run's metrics.jsonl, in order: a run folder, or a run's URI on an object store
    (read afresh, no cached listing; `endpoint_url`: the S3 API's). `kind` picks: None every line,
    "steps" the step reports (lines with a loss), "events" every event line, any other word the
    lines of that event ("resume", "workers")."""
    path = f"{str(run).rstrip('/')}/metrics.jsonl"
    if "://" in path:
        import fsspec

        options: dict[str, Any] = {"skip_instance_cache": True}
        if endpoint_url:
            options["client_kwargs"] = {"endpoint_url": endpoint_url}
        fs, inside = fsspec.core.url_to_fs(path, **options)
        text = fs.cat_file(inside).decode()
    else:
        text = Path(path).read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    if kind is None:
        return lines
    if kind == "steps":
        return [m for m in lines if "loss" in m]
    if kind == "events":
        return [m for m in lines if "event" in m]
    return [m for m in lines if m.get("event") == kind]


def shard_rows(out: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of every shard the manifest of the local ingest output `out` lists, in its order
    (`columns`: only those)."""
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in pq.read_table(out / s["path"], columns=columns).to_pylist()]


def read_rows(out: Path) -> dict[str, dict[str, Any]]:
    """shard_rows by scan id; a scan written twice fails the test."""
    rows: dict[str, dict[str, Any]] = {}
    for row in shard_rows(out):
        assert row["scan_id"] not in rows, "a scan was written twice"
        rows[row["scan_id"]] = row
    return rows


def trained_like(task: Any) -> Any:
    """Every parameter moved off its initial value (seeded), as training would."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
        if hasattr(task, "temperature"):
            task.temperature.tau.fill_(0.0234)
    return task.eval()


def s3_shard_rows(fs: Any, root: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The manifest of the shard set at `root` (bucket/prefix) on an s3fs filesystem, read fresh,
    and every row of its shards."""
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    rows: list[dict[str, Any]] = []
    for shard in manifest["shards"]:
        with fs.open(f"{root}/{shard['path']}", "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return manifest, rows


def export_to(folder: Path, task: Any, cfg: Any, assets: Any, step: int = 7, trained_on: Any = None) -> list[str]:
    """`task` exported to the local `folder` as a run at `step` would (trained on `trained_on`, a
    ctray.export.TrainedOn, or synthetic data)."""
    from ctray.export import ExportRun, write_export

    def write(name: str, data: bytes) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write_export(task, cfg.objective, assets, write, ExportRun(step, trained_on))


# --- the command ---

CTRAY_CLI = [sys.executable, "-m", "ctray.cli"]
"""The `ctray` command as a process, for the tests that must hold the process itself (kill it,
cut its storage while it runs); the others use ctray_cli."""


def ctray_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: str | Path = REPO,
    check: bool = False,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`ctray ARGS` run to its end as a user runs it (a process of its own, in the repository; `env`:
    its whole environment, this process's by default), its output captured as text. check: the test
    fails, with the output's tail, unless it exits 0."""
    done = subprocess.run(
        [*CTRAY_CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"ctray {' '.join(args[:1])} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}",
            pytrace=False,
        )
    return done


# --- processes of one torch.distributed group ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, out: Path, args: Any, world: int = 2, timeout_s: float = 240) -> list[Any]:
    """Run `script` as `world` processes of one torch.distributed group (gloo, DeepSpeed on CPU):
    `python script RANK WORLD PORT OUT ARGS_JSON`, with tests/ on their PYTHONPATH (the script
    imports init_rank from here); each writes OUT/rank{RANK}.json, returned in rank order. One rank
    failing leaves the others waiting in a collective: they are stopped at once, and the test fails
    with the log of the rank that failed first."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    procs = []
    for rank in range(world):
        with open(out / f"rank{rank}.log", "w") as log:  # the child writes to its own copy of the file
            argv = [sys.executable, script, str(rank), str(world), str(port), str(out), json.dumps(args)]
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    killed = {rank for rank, p in enumerate(procs) if p.poll() is None}
    for rank in killed:
        procs[rank].kill()
    for p in procs:
        p.wait()
    for rank in sorted(range(world), key=lambda rank: rank in killed):  # the rank that failed first
        if procs[rank].returncode != 0:
            why = f"killed: another rank failed, or {timeout_s:.0f} s passed" if rank in killed else "failed"
            pytest.fail(f"rank {rank} {why}:\n{(out / f'rank{rank}.log').read_text()[-6000:]}", pytrace=False)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def init_rank(argv: list[str]) -> tuple[int, int, Path, Any]:
    """In a script run by `run_ranks`: join the gloo group (env:// as Ray Train sets it up);
    returns rank, world size, output folder and the test's arguments."""
    from datetime import timedelta

    import torch.distributed

    rank, world, port, out, args = int(argv[1]), int(argv[2]), argv[3], Path(argv[4]), json.loads(argv[5])
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
    )  # fmt: skip
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    return rank, world, out, args


# --- a Ray head and a relay of the tests' own ---


def processes_of(temp: str) -> list:
    """Every process of the Ray whose temp dir is `temp`: those naming it, and their descendants."""
    import psutil

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


class RayHead:
    """A Ray head of the test's own (`ray start --head` on free loopback ports, its own temp dir:
    short, as Ray's socket paths have a length limit). Clients reach it with `env` (RAY_ADDRESS);
    `stop` kills only its processes, never another Ray on the machine (no `ray stop --force`)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, dashboard: bool = False, port: int = 0):
        self.temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        dash = free_port()
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "PATH": f"{BIN}:{os.environ['PATH']}",
            # Every process of this Ray (and its clients) finds this Ray, not the machine's others.
            "RAY_ADDRESS": self.address,
            **(env or {}),
        }
        ports = [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        where = [f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}"]
        shown = [
            f"--include-dashboard={str(dashboard).lower()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
        ]
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", *where, *shown, *ports, "--disable-usage-stats", *args],
            check=True,
            env=self.env,
            capture_output=True,
            timeout=120,
        )

    def stop(self) -> None:
        import psutil

        procs = processes_of(self.temp)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)


class Relay:
    """A TCP relay on 127.0.0.1 in front of the moto server that can be cut (storage going down
    mid-job: the port refuses connections, open ones are closed) while the server keeps its data."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target = target_port
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self.lock:
            self.sock.close()  # connection refused from now on, at once
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.open.clear()

    def restore(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def _accept(self, listening: socket.socket):
        while True:
            try:
                client, _ = listening.accept()
            except OSError:  # cut
                return
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


# --- the test servers ---


class Server:
    """A server process for the tests, started in the background (`start`) and waited for by the
    fixture that hands it out (`url`); stopped with its process group at the end of the run."""

    def __init__(self, name: str, argv: list[str], url: str, ready: Callable[[str], bool], log: Path):
        self.name, self.argv, self._url, self.ready, self.log = name, argv, url, ready, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        if self.proc is None:
            with open(self.log, "wb") as out:  # the child keeps its own copy of the file
                self.proc = subprocess.Popen(
                    self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                )  # fmt: skip
        return self

    def url(self, timeout_s: float = 120) -> str:
        self.start()
        assert self.proc is not None
        deadline = time.time() + timeout_s
        while not self.ready(self._url):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"{self.name} did not start:\n" + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        return self._url

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _answers_tcp(url: str) -> bool:
    try:
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=0.5).close()
        return True
    except OSError:
        return False


def _mlflow_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.read().strip() == b"OK"
    except OSError:
        return False


def servers() -> dict[str, Server]:
    """The test servers by the fixture that hands each out (not started)."""
    root = Path(tempfile.mkdtemp(prefix="ctray-test-servers-"))
    atexit.register(shutil.rmtree, root, True)
    moto, mlflow = free_port(), free_port()
    return {
        # A moto S3 server on loopback: real HTTP, real botocore/s3fs client code.
        "s3_endpoint": Server(
            "moto server",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto)],
            f"http://127.0.0.1:{moto}",
            _answers_tcp,
            root / "moto.log",
        ),
        # `mlflow server` with a SQLite store and artifacts proxied to a local folder; its uvicorn
        # worker is a child, stopped with it as a group.
        "mlflow_server": Server(
            "mlflow server",
            [
                *(sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1"),
                *("--port", str(mlflow), "--backend-store-uri", f"sqlite:///{root}/mlflow.db"),
                *("--artifacts-destination", str(root / "artifacts")),
            ],
            f"http://127.0.0.1:{mlflow}",
            _mlflow_healthy,
            root / "mlflow.log",
        ),
    }
