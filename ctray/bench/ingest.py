"""`ctray bench ingest`: ctray's per-scan preprocessing vs MONAI's LoadImage + Orientation +
Spacing chain on the same clinical-size NIfTI, one core each, in one run.

Each pipeline runs in its own fresh process with one thread (OMP/MKL/torch), so that "per core"
means what it says and peak memory is not inherited from the other. Peak memory is the process's
high-water mark (VmHWM, reset after imports and a warm-up) above its resident size before the
timed runs, compared with the raw int16 volume.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time

SPACING_OUT = (3.0, 1.0, 1.0)


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _ctray_chain():
    from ctray.ingest.config import PreprocessConfig
    from ctray.ingest.preprocess import preprocess
    from ctray.ingest.shards import file_sha256
    from ctray.ingest.volume import load_nifti

    cfg = PreprocessConfig(spacing=SPACING_OUT)

    def run(path: str):
        file_sha256(path)
        return preprocess(load_nifti(path, path), None, cfg).hu.shape

    return run


def _monai_chain():
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    chain = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation("SPL"), Spacing(pixdim=SPACING_OUT, mode="bilinear")])
    return lambda path: tuple(chain(path).shape[1:])


def _worker(name: str, path: str, repeats: int, queue) -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    run = {"ctray": _ctray_chain, "monai": _monai_chain}[name]()
    run(path)  # warm-up: imports, lazy initialisation, page cache
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _proc_kib("VmRSS")
    walls, cpus = [], []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        shape = run(path)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        walls.append(time.perf_counter() - t0)
        cpus.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    queue.put({"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
               "peak_extra_bytes": (_proc_kib("VmHWM") - rss0) * 1024, "out_shape": list(shape)})


def _measure(name: str, path: str, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    env_backup = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    os.environ.update({k: "1" for k in env_backup})
    try:
        proc = ctx.Process(target=_worker, args=(name, path, repeats, queue))
        proc.start()
        result = queue.get(timeout=1800)
        proc.join()
    finally:
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return result


def bench_ingest(shape: tuple[int, int, int], spacing: tuple[float, float, float], repeats: int, workdir: str | None) -> dict:
    import numpy as np

    from ctray.data.phantoms import make_phantom, write_nifti

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-")
        workdir = tmp.name
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f"phantom_{'x'.join(map(str, shape))}.nii.gz")
    if not os.path.exists(path):
        print(f"writing a {shape[2]}x{shape[1]}x{shape[0]} phantom at {spacing[2]}x{spacing[1]}x{spacing[0]} mm (x, y, z) to {path} ...", flush=True)
        p = make_phantom("bench", 0, shape, spacing)
        write_nifti(path, p.hu, p.affine, "RAS")
        del p
    raw_bytes = int(np.prod(shape)) * 2
    print(f"raw volume: {raw_bytes / 2**20:.0f} MiB int16; file {os.path.getsize(path) / 2**20:.0f} MiB; target spacing {SPACING_OUT} mm; {repeats} runs each, 1 thread", flush=True)
    results = {}
    for name in ("ctray", "monai"):
        results[name] = r = _measure(name, path, repeats)
        print(f"  {name:6s} {r['cpu_s']:6.2f} s CPU/scan  {1 / r['cpu_s']:6.3f} scans/s/core  wall {r['wall_s']:6.2f} s  "
              f"peak +{r['peak_extra_bytes'] / 2**20:6.0f} MiB ({r['peak_extra_bytes'] / raw_bytes:4.2f}x raw)  out {r['out_shape']}", flush=True)
    speedup = results["monai"]["cpu_s"] / results["ctray"]["cpu_s"]
    mem_ratio = results["ctray"]["peak_extra_bytes"] / raw_bytes
    print(f"ctray vs MONAI per core: {speedup:.2f}x (target >= 2x); ctray peak memory {mem_ratio:.2f}x the raw volume (target <= 3x)")
    figures = {
        "bench": "ingest", "shape_zyx": list(shape), "spacing_zyx": list(spacing), "raw_bytes": raw_bytes,
        "ctray_scans_per_s_per_core": round(1 / results["ctray"]["cpu_s"], 4),
        "monai_scans_per_s_per_core": round(1 / results["monai"]["cpu_s"], 4),
        "speedup_vs_monai": round(speedup, 3),
        "ctray_peak_over_raw": round(mem_ratio, 3),
        "monai_peak_over_raw": round(results["monai"]["peak_extra_bytes"] / raw_bytes, 3),
        "ctray": results["ctray"], "monai": results["monai"],
    }
    print(json.dumps(figures))
    if tmp is not None:
        tmp.cleanup()
    return figures
