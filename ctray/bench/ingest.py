"""`ctray bench ingest`: ctray's per-scan preprocessing vs MONAI's LoadImage + Orientation +
Spacing chain on the same clinical-size NIfTI, one core each, in one run.

Each pipeline runs in its own fresh process with one thread (OMP/MKL/torch), so that "per core"
means what it says and peak memory is not inherited from the other: an untimed scan, then
`repeats` timed runs of as many scans as fill `seconds` each, alternating between the two (so that
run i of each sees the same machine); CPU is the process's own. Peak
memory is the process's high-water mark (VmHWM, reset after imports and the warm-up) above its
resident size before the timed runs, compared with the raw int16 volume.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from functools import partial

from ctray.bench.common import OneCore, OtherLoad, clinical_phantom, spread, summary

SPACING_OUT = (3.0, 1.0, 1.0)


def _ctray_chain(path: str) -> Callable[[], list[int]]:
    from ctray.ingest.config import PreprocessConfig
    from ctray.ingest.preprocess import preprocess
    from ctray.ingest.shards import file_sha256
    from ctray.ingest.volume import load_nifti

    cfg = PreprocessConfig(spacing=SPACING_OUT)

    def run() -> list[int]:
        file_sha256(path)
        return list(preprocess(load_nifti(path, path), None, cfg).hu.shape)

    return run


def _monai_chain(path: str) -> Callable[[], list[int]]:
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    chain = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation("SPL"),
            Spacing(pixdim=SPACING_OUT, mode="bilinear"),
        ]
    )
    return lambda: list(chain(path).shape[1:])


def bench_ingest(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    repeats: int,
    seconds: float,
    workdir: str | None,
) -> dict:
    import numpy as np

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-")
        workdir = tmp.name
    path = clinical_phantom(workdir, shape, spacing)
    raw_bytes = int(np.prod(shape)) * 2
    print(
        f"raw volume: {raw_bytes / 2**20:.0f} MiB int16; file {os.path.getsize(path) / 2**20:.0f} MiB;"
        f" target spacing {SPACING_OUT} mm; {repeats} runs of >= {seconds:g} s each, 1 thread",
        flush=True,
    )
    procs = {"ctray": OneCore(partial(_ctray_chain, path)), "monai": OneCore(partial(_monai_chain, path))}
    runs: dict[str, list[dict]] = {name: [] for name in procs}
    other = OtherLoad()
    for _ in range(repeats):  # alternating, so that run i of each sees the same machine
        for name, proc in procs.items():
            runs[name].append(proc.run(seconds))
    other_cores = other.cores()
    results = {}
    for name, proc in procs.items():
        results[name] = r = summary(runs[name], proc.close())
        r["out_shape"] = r.pop("result")
        print(
            f"  {name:6s} {r['cpu_s']:6.2f} s CPU/scan (median of {repeats} runs of {r['calls_per_run']} scans,"
            f" spread {100 * r['cpu_spread']:.0f}%)  "
            f"{1 / r['cpu_s']:6.3f} scans/s/core  wall {r['wall_s']:6.2f} s  "
            f"peak +{r['peak_extra_bytes'] / 2**20:6.0f} MiB ({r['peak_extra_bytes'] / raw_bytes:4.2f}x raw)"
            f"  out {r['out_shape']}",
            flush=True,
        )
    speedup = results["monai"]["cpu_s"] / results["ctray"]["cpu_s"]
    # The ratio's spread over paired runs: ctray's run i against MONAI's run i.
    ratios = [m / c for m, c in zip(results["monai"]["cpu_s_runs"], results["ctray"]["cpu_s_runs"], strict=True)]
    mem_ratio = results["ctray"]["peak_extra_bytes"] / raw_bytes
    print(
        f"ctray vs MONAI per core: {speedup:.2f}x (spread {100 * spread(ratios):.0f}% over {repeats} paired runs;"
        " target >= 2x);"
        f" ctray peak memory {mem_ratio:.2f}x the raw volume (target <= 3x); other processes kept"
        f" {other_cores:.1f} of {os.cpu_count()} cores busy during the timed runs"
    )
    figures = {
        "bench": "ingest",
        "shape_zyx": list(shape),
        "spacing_zyx": list(spacing),
        "raw_bytes": raw_bytes,
        "ctray_scans_per_s_per_core": round(1 / results["ctray"]["cpu_s"], 4),
        "monai_scans_per_s_per_core": round(1 / results["monai"]["cpu_s"], 4),
        "speedup_vs_monai": round(speedup, 3),
        "speedup_spread": round(spread(ratios), 3),
        "ctray_peak_over_raw": round(mem_ratio, 3),
        "monai_peak_over_raw": round(results["monai"]["peak_extra_bytes"] / raw_bytes, 3),
        "other_load_cores": round(other_cores, 2),
        "ctray": results["ctray"],
        "monai": results["monai"],
    }
    print(json.dumps(figures))
    if tmp is not None:
        tmp.cleanup()
    return figures
