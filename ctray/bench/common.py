"""Shared by the benchmarks: the clinical-size phantom file and one-core measurements in a fresh
process (so "per core" holds and peak memory is not inherited)."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.queues
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def clinical_phantom(workdir: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> str:
    """A phantom written as RAS .nii.gz like a scanner export (cached in `workdir`)."""
    from ctray.data.phantoms import make_phantom, write_nifti

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"phantom_{'x'.join(map(str, shape))}_{'x'.join(map(str, spacing))}.nii.gz")
    if not os.path.exists(path):
        print(
            f"writing a {shape[2]}x{shape[1]}x{shape[0]} phantom at {spacing[2]}x{spacing[1]}x{spacing[0]} mm"
            f" (x, y, z) to {path} ...",
            flush=True,
        )
        p = make_phantom("bench", 0, shape, spacing)
        write_nifti(path + ".tmp.nii.gz", p.hu, p.affine, "RAS")
        os.replace(path + ".tmp.nii.gz", path)
    return path


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _worker(
    factory: Callable[[], Callable[[], object]], repeats: int, queue: multiprocessing.queues.Queue[dict[str, Any]]
) -> None:
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
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = run()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        walls.append(time.perf_counter() - t0)
        cpus.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    queue.put(
        {
            "wall_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus),
            "cpu_s_runs": cpus,
            "cpu_spread": spread(cpus),
            "peak_extra_bytes": (_proc_kib("VmHWM") - rss0) * 1024,
            "result": out,
        }
    )


def spread(values: list[float]) -> float:
    """(max - min) / median of repeated measurements: how far one run can be from the figure."""
    return (max(values) - min(values)) / statistics.median(values) if values else float("nan")


def one_core(factory: Callable[[], Callable[[], object]], repeats: int) -> dict:
    """Run `factory()()` `repeats` times (after a warm-up) in a fresh single-threaded process.

    `factory` must be a module-level callable (it is pickled into the process); it builds the
    timed closure, so imports and set-up are not timed. Returns median wall and CPU seconds, every
    run's CPU seconds and their spread, the peak memory above the pre-run resident size, and the
    closure's last return value."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
        proc = ctx.Process(target=_worker, args=(factory, repeats, queue))
        proc.start()
        result = queue.get(timeout=3600)
        proc.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return result


class CpuMeter:
    """Machine-wide busy CPU seconds (all processes: Ray workers, raylet, the driver) from
    /proc/stat, for pipelines that span processes. Run on an otherwise idle machine."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")

    def busy(self) -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / self.hz
