"""`ctray doctor ADDRESS [JOB.yaml ...]`: what a job would meet on a Ray cluster, in a few lines,
before it is submitted: versions of the driver against the nodes, the autoscaler and its node types
(and whether each job's workers fit one), GPUs with torch's CUDA build against the driver, bf16,
NCCL/EFA settings, and the jobs' storage reached with their credentials.

Each node answers through a zero-CPU Ray task pinned to it (a head that offers no CPU for work
answers too). Nothing is launched: node types are read from the autoscaler's config, where the
cluster publishes it (KubeRay) or the head's autoscaler was started with it (`ray up`, v1 and v2).
Only names and versions are printed: never a config's credentials or a storage path's contents.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ctray.config import load_config
from ctray.errors import ConfigError, CtrayError, first_line
from ctray.runtime import autoscaler_report, autoscaler_v2, describe, fits, published_node_types

log = logging.getLogger(__name__)

NET_PREFIXES = ("NCCL_", "FI_")
"""Environment variables of GPU networking (NCCL, libfabric/EFA) a node's processes inherit."""
PROBE_TIMEOUT_S = 60.0
NODE_DEATH_S = 15.0
"""How long a node that did not answer may take to show as dead (scaled down meanwhile)."""


@dataclass
class Line:
    """One finding: what was checked, what was found, and whether a job would fail on it."""

    topic: str
    text: str
    ok: bool = True


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)

    def add(self, topic: str, text: str, ok: bool = True) -> None:
        self.lines.append(Line(topic, text, ok))

    @property
    def problems(self) -> list[Line]:
        return [line for line in self.lines if not line.ok]


def probe_node() -> dict[str, Any]:
    """Runs on a node (a Ray task): what a job's process there would find."""
    import glob
    import importlib.metadata
    import platform
    import shutil
    import subprocess

    import ray

    out: dict[str, Any] = {"python": platform.python_version(), "ray": ray.__version__}
    try:
        out["ctray"] = importlib.metadata.version("ctray")
    except importlib.metadata.PackageNotFoundError:
        out["ctray"] = None
    out["net_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(NET_PREFIXES)}
    # The RDMA devices a container was given (--device=/dev/infiniband; EFA on AWS's p4d and p5).
    out["efa_devices"] = len(glob.glob("/dev/infiniband/uverbs*"))
    out["driver"] = out["driver_cuda"] = None
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
            out["driver_cuda"] = smi.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in smi else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
    out["torch"] = out["torch_cuda"] = out["bf16"] = None
    out["gpu_names"] = []
    if out["driver"] is not None or gpus:
        try:
            import torch

            out["torch"], out["torch_cuda"] = torch.__version__, torch.version.cuda
            if torch.cuda.is_available():
                out["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                out["bf16"] = bool(torch.cuda.is_bf16_supported())
        except Exception as e:  # a broken CUDA install is what this reports
            out["torch_error"] = first_line(e)
    return out


def read_autoscaler_config() -> dict[str, Any] | None:
    """Runs on the head node: the node types of the config its autoscaler monitor was started with
    (`--autoscaling-config`, as `ray up` and Ray's fake multi-node provider start it), resources
    and sizes only; None where no monitor runs with one."""
    import psutil
    import yaml

    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info.get("cmdline") or []
        if not any("monitor.py" in a for a in cmdline):
            continue
        for arg in cmdline:
            if arg.startswith("--autoscaling-config="):
                try:
                    with open(arg.split("=", 1)[1]) as f:
                        config = yaml.safe_load(f)
                except OSError:
                    return None
                return {
                    name: {
                        "resources": spec.get("resources") or {},
                        "min_workers": spec.get("min_workers", 0),
                        "max_workers": spec.get("max_workers", config.get("max_workers", 0)),
                    }
                    for name, spec in (config.get("available_node_types") or {}).items()
                    if name != config.get("head_node_type")
                }
    return None


def _reachable(address: str) -> None:
    """Fail in one line, at once, where nothing listens at ADDRESS (ray.init would retry for a minute)."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as e:
        raise ConfigError(f"no Ray cluster at {address}: {first_line(e)}") from None


def _node_types(head: str | None) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """Node types the autoscaler may launch, and where they were read."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    published = published_node_types()
    if published is not None:
        return published, "the cluster's published config"
    if head is None:
        return None, ""
    task = ray.remote(read_autoscaler_config).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)
    )
    return ray.get(task.remote(), timeout=PROBE_TIMEOUT_S), "the head's autoscaling config"


def _job_shapes(path: str) -> tuple[str, list[tuple[str, dict[str, float]]], list[tuple[str, Any, bool]]]:
    """A job YAML's kind, the resource shapes its work asks for, and the storage it touches
    (uri, StorageConfig, whether it is read: an input must exist, an output may not yet)."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if "objective" in raw:
        from ctray.train.config import PretrainConfig

        pre = load_config(PretrainConfig, path)
        shapes = [(f"training worker (x{pre.scaling.num_workers})", pre.scaling.worker_bundle())]
        return "pretrain", shapes, [(pre.data.shards, pre.storage, True), (pre.run.storage, pre.storage, False)]
    if "base" in raw:
        from ctray.train.config import PretrainConfig
        from ctray.tune.config import SweepConfig

        sweep = load_config(SweepConfig, path)
        base = load_config(PretrainConfig, sweep.base, sweep.overrides)
        shapes = [("trial", sweep.trial_resources()), ("training worker of a trial", base.scaling.worker_bundle())]
        return "sweep", shapes, [(base.data.shards, base.storage, True), (sweep.storage, sweep.storage_options, False)]
    if "input" in raw:
        from ctray.ingest.config import IngestConfig

        ingest = load_config(IngestConfig, path)
        storages = [(ingest.input.scans, ingest.storage, True), (ingest.output.uri, ingest.storage, False)]
        return "ingest", [("shard writer", ingest.writer_shape())], storages
    raise ConfigError(f"{path}: not a pretrain, sweep or ingest config (no objective, base or input section)")


def _storage_line(uri: str, storage: Any, read: bool) -> tuple[str, bool]:
    """Whether the job's credentials reach `uri` from here (the driver's side): an input must exist;
    an output is fine once some folder above it (an s3:// bucket) does."""
    from ctray.storage import filesystem

    try:
        fs, path = filesystem(uri, storage)
        if fs.exists(path):
            return f"{uri}: reachable", True
        if read:
            return f"{uri}: not found", False
        parts = path.rstrip("/").split("/")
        for depth in range(len(parts) - 1, 0, -1):
            above = "/".join(parts[:depth])
            if above and fs.exists(above):
                return f"{uri}: not written yet ({above} is reachable)", True
        return f"{uri}: not found, nor any folder above it", False
    except Exception as e:  # credentials, DNS, a refused endpoint: the job would meet the same
        return f"{uri}: unreachable ({type(e).__name__})", False


def _fit(
    shape: dict[str, float], alive: list[dict], types: dict[str, dict[str, Any]] | None, scaling: str
) -> tuple[str, bool]:
    running = [n for n in alive if fits(n["Resources"], shape)]
    if running:
        return f"fits {len(running)} running node(s)", True
    if types:
        fitting = [name for name, t in types.items() if t["max_workers"] != 0 and fits(t["resources"], shape)]
        if fitting:
            return f"fits node type {', '.join(sorted(fitting))} (launched on demand)", True
        return "fits no node type: the job would be refused", False
    if scaling == "none":
        return "fits no node, and no autoscaler can add one", False
    return "no running node fits; the autoscaler's node types are not readable from here (the job asks it)", True


def _ask_nodes(alive: list[dict]) -> tuple[dict[str, dict[str, Any] | None], list[str]]:
    """Each alive node's probe_node answer (None: no answer in time), and the nodes that left the
    cluster meanwhile: an idle node the autoscaler removed is no problem of the cluster's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(probe_node)
    refs = {
        n["NodeID"]: probe.options(
            num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in alive
    }
    nodes: dict[str, dict[str, Any] | None] = {}
    for node_id, ref in refs.items():
        try:
            nodes[node_id] = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except Exception:
            nodes[node_id] = None
    silent = {k for k, v in nodes.items() if v is None}
    deadline = time.time() + NODE_DEATH_S
    while True:  # a node that was going away as it was asked is reported dead within seconds
        left = silent - {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if left == silent or time.time() > deadline:
            break
        time.sleep(1)
    return {k: v for k, v in nodes.items() if k not in left}, sorted(left)


def _version_lines(report: Report, nodes: dict[str, dict[str, Any] | None]) -> None:
    """Ray, Python and ctray of this driver against the nodes'."""
    import importlib.metadata
    import platform

    import ray

    answered = [n for n in nodes.values() if n is not None]
    mine = (platform.python_version(), ray.__version__)
    versions = sorted({(n["python"], n["ray"]) for n in answered})
    there = ", ".join(f"Ray {r} / Python {p}" for p, r in versions) or "no node answered"
    report.add("versions", f"driver Ray {mine[1]} / Python {mine[0]}; nodes {there}", versions == [mine])
    try:
        ctray_here = importlib.metadata.version("ctray")
    except importlib.metadata.PackageNotFoundError:
        ctray_here = "not installed"
    on_nodes = sorted({str(n["ctray"]) for n in answered})
    missing = " (jobs need --working-dir with ctray)" if "None" in on_nodes else ""
    report.add("ctray", f"driver {ctray_here}; nodes {', '.join(on_nodes)}{missing}", on_nodes == [ctray_here])
    silent = [k[:8] for k, v in nodes.items() if v is None]
    if silent:
        text = f"{len(silent)} node(s) did not answer in {PROBE_TIMEOUT_S:.0f} s: {', '.join(silent)}"
        report.add("nodes", text, False)


def _gpu_lines(report: Report, nodes: dict[str, dict[str, Any] | None], types: dict[str, Any] | None) -> None:
    gpu_nodes = [n for n in nodes.values() if n is not None and (n["driver"] or n["torch_cuda"] or n["gpu_names"])]
    if not gpu_nodes:
        gpu_types = sorted(name for name, t in (types or {}).items() if t["resources"].get("GPU", 0) > 0)
        later = f" (node types with GPUs, checked when they run: {', '.join(gpu_types)})" if gpu_types else ""
        report.add("gpus", "no GPU on the running nodes" + later)
    for n in gpu_nodes:
        report.add(*_gpu_line(n))
        report.add(*_net_line(n))


def diagnose(address: str | None, jobs: list[str]) -> Report:
    """Connect to the cluster at `address` (None: RAY_ADDRESS) and gather the report."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster address: give one (ctray doctor HOST:PORT) or set RAY_ADDRESS")
    parsed = [(path, *_job_shapes(path)) for path in jobs]  # a bad job YAML fails before connecting
    _reachable(address)
    report = Report()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        head = next((n["NodeID"] for n in alive if "node:__internal_head__" in n["Resources"]), None)
        nodes, left = _ask_nodes(alive)
        alive = [n for n in alive if n["NodeID"] not in left]
        if left:
            report.add("nodes", f"{len(left)} node(s) left the cluster while asked (scaled down)")
        _version_lines(report, nodes)

        scaling = "v2" if autoscaler_v2() else ("v1" if autoscaler_report() else "none")
        types, source = _node_types(head)
        if types is not None and scaling == "none":
            scaling = "KubeRay"
        kinds = "; ".join(
            f"{name} ({describe(t['resources'])}, {t['min_workers']}-{t['max_workers']})"
            for name, t in sorted((types or {}).items())
        )
        published = f"; node types from {source}: {kinds}" if types else "; node types not published"
        report.add("autoscaler", scaling + published, scaling != "none" or bool(alive))
        report.add("nodes", "; ".join(sorted(describe(n["Resources"]) for n in alive)) or "none")

        for path, kind, shapes, storages in parsed:
            for what, shape in shapes:
                text, ok = _fit(shape, alive, types, scaling)
                report.add(f"job {path}", f"{kind} {what} ({describe(shape)}): {text}", ok)
            for uri, storage, read in storages:
                text, ok = _storage_line(uri, storage, read)
                report.add(f"job {path}", f"storage {text}", ok)
        _gpu_lines(report, nodes, types)
    finally:
        ray.shutdown()
    return report


def _gpu_line(n: dict[str, Any]) -> tuple[str, str, bool]:
    """torch's CUDA build against the driver's CUDA version, and bf16."""
    names = ", ".join(sorted(set(n["gpu_names"]))) or "GPU"
    if n.get("torch_error") or n["torch"] is None:
        return "gpus", f"{names}: torch not importable ({n.get('torch_error', 'not installed')})", False
    if n["torch_cuda"] is None:
        return "gpus", f"{names}: torch {n['torch']} is a CPU build", False

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2])

    drivable = n["driver_cuda"] is not None and version(n["torch_cuda"]) <= version(n["driver_cuda"])
    text = (
        f"{len(n['gpu_names'])}x {names}: torch {n['torch']} CUDA {n['torch_cuda']}, driver {n['driver']} "
        f"(CUDA {n['driver_cuda']}); bf16 {'yes' if n['bf16'] else 'no'}"
    )
    return "gpus", text, drivable and bool(n["bf16"])


def _net_line(n: dict[str, Any]) -> tuple[str, str, bool]:
    env = n["net_env"]
    shown = ", ".join(f"{k}={v}" for k, v in env.items()) or "no NCCL_/FI_ settings"
    efa = n["efa_devices"]
    ok = not (efa and env.get("FI_PROVIDER") != "efa")
    note = f"; {efa} EFA device(s)" + ("" if ok else ": set FI_PROVIDER=efa and NCCL_NET=OFI (cluster/aws.yaml)")
    return "network", shown + (note if efa else ""), ok


def format_report(report: Report) -> list[str]:
    """The report's lines as printed: credentials a URI or a setting may carry are masked
    (ctray.redact)."""
    from ctray.redact import redact_text

    width = max((len(line.topic) for line in report.lines), default=0)
    return [redact_text(f"{'ok' if line.ok else '!!'} {line.topic:<{width}}  {line.text}") for line in report.lines]


def run_doctor(address: str | None, jobs: list[str]) -> None:
    report = diagnose(address, jobs)
    print("\n".join(format_report(report)), file=sys.stdout, flush=True)
    if report.problems:
        raise CtrayError(f"{len(report.problems)} problem(s) a job would meet, marked !! above")
    log.info("doctor: nothing a job would trip on")
