"""Shared by the benchmarks: the clinical-size phantom file; one-core measurements in a fresh
process (so "per core" holds and peak memory is not inherited); the CPU time of this process and
its descendants (a local Ray's processes included); and how busy other processes kept the cores."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def clinical_phantom(workdir: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> str:
    """A phantom written as RAS .nii.gz like a scanner export, its label map beside it (.mask.nii.gz)
    and its report (.json), cached in `workdir`; returns the scan's path."""
    import json

    from ctray.data.phantoms import make_phantom, write_nifti

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"phantom_{'x'.join(map(str, shape))}_{'x'.join(map(str, spacing))}.nii.gz")
    parts = (path, path.replace(".nii.gz", ".mask.nii.gz"), path.replace(".nii.gz", ".json"))
    if not all(os.path.exists(p) for p in parts):
        print(
            f"writing a {shape[2]}x{shape[1]}x{shape[0]} phantom at {spacing[2]}x{spacing[1]}x{spacing[0]} mm"
            f" (x, y, z) to {path} ...",
            flush=True,
        )
        p = make_phantom("bench", 0, shape, spacing)
        write_nifti(parts[1] + ".tmp.nii.gz", p.labels, p.affine, "RAS")
        os.replace(parts[1] + ".tmp.nii.gz", parts[1])
        with open(parts[2], "w") as f:
            json.dump({"report": p.report}, f)
        write_nifti(path + ".tmp.nii.gz", p.hu, p.affine, "RAS")
        os.replace(path + ".tmp.nii.gz", path)
    return path


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Staged(NamedTuple):
    """What a timed closure returns to have the CPU seconds of its stages reported besides its own
    (OneCore: per call, the mean over a run)."""

    result: object
    cpu_s: dict[str, float]
    """CPU seconds of each named stage of this call (time.process_time differences)."""


def _worker(factory: Callable[[], Callable[[], object]], conn: Connection) -> None:
    """OneCore's process: build the closure, call it once (warm-up), then answer each `seconds`
    sent with one timed run, and None with the peak memory since the warm-up."""
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    run = factory()
    run()  # warm-up: imports, lazy initialisation, page cache
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _proc_kib("VmRSS")
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
        stages: dict[str, float] = {}
        while n == 0 or time.perf_counter() - t0 < seconds:
            out = run()
            n += 1
            if isinstance(out, Staged):
                for stage, cpu_s in out.cpu_s.items():
                    stages[stage] = stages.get(stage, 0.0) + cpu_s
                out = out.result
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        per_call = {stage: total / n for stage, total in stages.items()}
        wall = (time.perf_counter() - t0) / n
        conn.send({"cpu_s": cpu / n, "wall_s": wall, "calls": n, "stages_cpu_s": per_call, "result": out})
    conn.send((_proc_kib("VmHWM") - rss0) * 1024)


def spread(values: list[float]) -> float:
    """(max - min) / median of repeated measurements: how far one run can be from the figure."""
    return (max(values) - min(values)) / statistics.median(values) if values else float("nan")


class OneCore:
    """`factory()()` timed on request in a fresh single-threaded process (OMP/MKL/torch threads 1).

    `factory` must be a module-level callable (it is pickled into the process); it builds the
    timed closure, so imports and set-up are not timed. Construction returns once the process has
    made one untimed warm-up call. Each `run(seconds)` calls the closure until `seconds` of wall
    time have passed (at least once), so that a run is long enough to be a steady state, and
    returns per call the CPU seconds (the process's own, user + system, all its threads: other
    processes do not count) and wall seconds, the calls made, the closure's last return value and,
    where the closure returns a Staged, the mean CPU seconds per call of each of its stages.
    Runs can be interleaved with another pipeline's, so that both see the same machine.
    `close()` returns the peak memory above the resident size after the warm-up."""

    def __init__(self, factory: Callable[[], Callable[[], object]]):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        try:
            self.proc = ctx.Process(target=_worker, args=(factory, child), daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._recv()  # the warm-up is done

    def _recv(self) -> Any:
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"the benchmark process exited with code {self.proc.exitcode}")
        return self.conn.recv()

    def run(self, seconds: float) -> dict[str, Any]:
        self.conn.send(seconds)
        return self._recv()

    def close(self) -> int:
        self.conn.send(None)
        peak = self._recv()
        self.proc.join()
        return peak


def one_core(factory: Callable[[], Callable[[], object]], repeats: int, seconds: float = 0.0) -> dict:
    """`repeats` runs of OneCore(factory), one after another: per call, the median wall and CPU
    seconds, every run's CPU seconds and their spread, the median CPU seconds of each stage (of a
    closure that returns a Staged), the calls in each run, the peak memory above the resident size
    after the warm-up, and the closure's last return value."""
    proc = OneCore(factory)
    return summary([proc.run(seconds) for _ in range(repeats)], proc.close())


def summary(runs: list[dict[str, Any]], peak_extra_bytes: int) -> dict:
    """OneCore runs as one_core returns them."""
    cpus = [r["cpu_s"] for r in runs]
    return {
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "cpu_s": statistics.median(cpus),
        "cpu_s_runs": cpus,
        "cpu_spread": spread(cpus),
        "stages_cpu_s": {
            stage: statistics.median(r["stages_cpu_s"][stage] for r in runs) for stage in runs[0]["stages_cpu_s"]
        },
        "calls_per_run": [r["calls"] for r in runs],
        "peak_extra_bytes": peak_extra_bytes,
        "result": runs[-1]["result"],
    }


ROLES = ("driver", "workers", "coordinator", "spilling", "ray")
"""TreeCpu's groups: this process; Ray's workers that run Ray Data's operators (or wait idle);
Ray Data's split coordinator actor; Ray's object spilling and restoring workers; the rest of Ray
(GCS, raylet, its helper processes and actors)."""


def _role(proc: Any) -> str:
    """Which of ROLES a process is (see role_of)."""
    import psutil

    if proc.pid == os.getpid():
        return "driver"
    try:
        return role_of(" ".join(proc.cmdline()[:1]) or proc.name())
    except psutil.Error:
        return "ray"


def role_of(title: str) -> str:
    """Which of ROLES (but the driver) a process of a local Ray is, by its title ("ray::IDLE",
    "ray::MapBatches(...)", "ray::SplitCoordinator.get", "ray::IDLE_SpillWorker", "raylet"): a
    worker's title changes with its task, its group does not."""
    if "SpillWorker" in title or "RestoreWorker" in title or "DeleteWorker" in title:
        return "spilling"
    if "SplitCoordinator" in title:
        return "coordinator"
    if title.startswith(("ray::IDLE", "ray::Read", "ray::Map")):
        return "workers"
    return "ray"


class TreeCpu:
    """CPU seconds (user + system) spent by this process and its descendants: for a local Ray
    started by this process (ray.init(address="local")), the driver, GCS, raylet, Ray's helper
    processes and every worker, and nothing else on the machine, so other load does not land in the
    figure. A process counts from its start if it appears between two snapshots; one that exits
    counts through its parent's `children_*` times once the parent has reaped it (Ray reaps its
    workers), or is lost if it was re-parented (delta() says how many exited)."""

    def __init__(self) -> None:
        import psutil

        self.root = psutil.Process()

    def snapshot(self) -> dict[tuple[int, float], tuple[str, float]]:
        """{(pid, start time): (role, CPU seconds including reaped children)} of the tree now."""
        import psutil

        out = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                    out[key] = (_role(proc), t.user + t.system + t.children_user + t.children_system)
            except psutil.Error:  # exited while listed: counted by its parent once reaped
                continue
        return out

    def has_ray(self) -> bool:
        """Whether a raylet runs in this tree (a local Ray this process started)."""
        import psutil

        for proc in self.root.children(recursive=True):
            try:
                if proc.name() == "raylet":
                    return True
            except psutil.Error:
                continue
        return False

    @staticmethod
    def delta(
        before: dict[tuple[int, float], tuple[str, float]], after: dict[tuple[int, float], tuple[str, float]]
    ) -> tuple[dict[str, float], int]:
        """CPU seconds per role between two snapshots, and how many processes exited in between."""
        roles = dict.fromkeys(ROLES, 0.0)
        for key, (role, cpu) in after.items():
            roles[role] = roles.get(role, 0.0) + cpu - before.get(key, (role, 0.0))[1]
        return roles, sum(key not in after for key in before)


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (every process, and time stolen by the
    hypervisor), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many cores the machine's other processes (outside this process tree) kept busy on
    average since construction: CPU time measures work only as long as the cores and caches are
    not shared, so a figure taken under other load can read high.

    By default this tree's CPU is read at both ends (TreeCpu), which is exact while no process of
    the tree exits (Ray does not add the CPU of workers it kills to its own children's). With
    `sample_s`, a thread reads each process's own CPU every `sample_s` seconds instead and keeps
    the last reading of each that exits (for runs whose workers come and go, as Ray Train's)."""

    def __init__(self, sample_s: float | None = None) -> None:
        import threading

        self.tree = TreeCpu()
        self.t0, self.busy0 = time.perf_counter(), _machine_busy_s()
        self.snap0 = self.tree.snapshot()
        self.sampled = sample_s is not None
        self._first = self._last = self._own() if self.sampled else {}
        self._stop = threading.Event()
        if sample_s is not None:
            threading.Thread(target=self._sample, args=(sample_s,), daemon=True).start()

    def _own(self) -> dict[tuple[int, float], float]:
        import psutil

        out = {}
        for proc in [self.tree.root, *self.tree.root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    out[(proc.pid, proc.create_time())] = t.user + t.system
            except psutil.Error:
                continue
        return out

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self._last = {**self._last, **self._own()}

    def cores(self) -> float:
        if self.sampled:
            self._stop.set()
            last = {**self._last, **self._own()}
            mine = sum(cpu - self._first.get(key, 0.0) for key, cpu in last.items())
        else:
            mine = sum(self.tree.delta(self.snap0, self.tree.snapshot())[0].values())
        return max(0.0, _machine_busy_s() - self.busy0 - mine) / (time.perf_counter() - self.t0)
