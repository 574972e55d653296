"""`ctray bench data`: CPU time per view delivered from shards, vs CT-FM's per-step MONAI chain,
on the same clinical-size volume, in one run.

ctray: the scan is ingested once (not timed: it is paid once per data set, see `bench ingest`),
copied to `scans` rows, and a local Ray Data pipeline (read_parquet -> PatchSampler map_batches ->
iter_torch_batches) delivers CT-FM batches of M patches per scan; each patch becomes two views.
CPU time is every process's (Ray workers, raylet, the consuming driver) from /proc/stat.
The views themselves are made from the patches on the training device (GPU); on a CPU-only
machine that work lands on the CPU as well, so it is measured and printed separately.

CT-FM: LoadImage, Orientation SPL, Spacing 3x1x1, intensity window, crop foreground, pad, M random
patches, then per patch two views of random resized crop + flip + histogram shift + Gaussian
smoothing, in one process with one thread (what each of CT-FM's loader workers does per step).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ctray.bench.common import CpuMeter, clinical_phantom, one_core, spread

WINDOW = (-1024.0, 2048.0)


def _monai_ctfm_chain(path: str, m: int, patch: tuple[int, int, int]) -> Callable[[], int]:
    from monai.transforms import (
        Compose,
        CropForeground,
        EnsureChannelFirst,
        LoadImage,
        Orientation,
        RandFlip,
        RandGaussianSmooth,
        RandHistogramShift,
        RandScaleCrop,
        RandSpatialCropSamples,
        Resize,
        ScaleIntensityRange,
        Spacing,
        SpatialPad,
    )

    load = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation("SPL"),
            Spacing(pixdim=(3.0, 1.0, 1.0), mode="bilinear"),
            ScaleIntensityRange(WINDOW[0], WINDOW[1], 0.0, 1.0, clip=True),
            CropForeground(),
            SpatialPad(patch),
            RandSpatialCropSamples(patch, num_samples=m, random_size=False),
        ]
    )
    # CT-FM's RandomResizedCrop: one s ~ U(0.33, 1) per view, RandScaleCrop(s) on every axis, then Resize.
    rng = np.random.default_rng(0)
    resize = Resize(patch, mode="trilinear")
    rest = Compose(
        [
            RandFlip(prob=0.5, spatial_axis=0),
            RandHistogramShift(num_control_points=5, prob=0.5),
            RandGaussianSmooth(prob=0.5),
        ]
    )

    def view(p: Any) -> Any:
        return rest(resize(RandScaleCrop(roi_scale=float(rng.uniform(0.33, 1.0)), random_size=False)(p)))

    def run() -> int:
        patches = load(path)
        return len([view(p) for p in patches for _ in range(2)])

    return run


def _device_views(m: int, patch: tuple[int, int, int], scans: int) -> Callable[[], int]:
    import torch

    from ctray.objectives.ctfm.config import CTFMConfig
    from ctray.objectives.ctfm.task import CTFMTask

    task = CTFMTask(CTFMConfig(patches_per_scan=m, patch_size=patch, init_filters=4, blocks_down=(1,), head_dims=(8,)))
    batch = torch.randint(-1024, 2048, (scans, m, *patch), dtype=torch.int16)
    return lambda: int(task.views(batch).shape[0])


def bench_data(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    m: int,
    patch: tuple[int, int, int],
    scans: int,
    epochs: int,
    workdir: str | None,
    repeats: int = 3,
) -> dict:
    import ray

    from ctray.config import StorageConfig, load_config
    from ctray.data.pipeline import training_datasets
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest
    from ctray.objectives.ctfm.sampler import PatchSampler

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-")
        workdir = tmp.name
    root = workdir
    path = clinical_phantom(root, shape, spacing)
    scan_dir = os.path.join(root, "bench-data-scans")
    os.makedirs(scan_dir, exist_ok=True)
    for i in range(scans):
        link = os.path.join(scan_dir, f"copy{i:03d}.nii.gz")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(path), link)
    shards = os.path.join(root, f"bench-data-shards-{scans}")
    print(f"ingesting {scans} copies of the scan (once, not timed) ...", flush=True)
    run_ingest(
        load_config(IngestConfig, None, [f"input.scans={scan_dir}", f"output.uri={shards}", "output.scans_per_shard=4"])
    )

    # One run = `epochs` passes over the rows in one Ray Data execution (long enough that task
    # start-up is a small part); a first, untimed run warms Ray's worker processes and the page
    # cache; then `repeats` timed runs give the median and the spread.
    ds = training_datasets(shards, StorageConfig(), PatchSampler(m, patch), None, 0, 0, scans * epochs, 1, 1)["train_0"]
    meter = CpuMeter()
    runs_ms, views, wall = [], 0, 0.0
    for run in range(repeats + 1):
        cpu0, t0, n = meter.busy(), time.perf_counter(), 0
        for batch in ds.iter_torch_batches(batch_size=2, prefetch_batches=2):
            n += 2 * batch["patches"].shape[0] * batch["patches"].shape[1]
        if run:
            runs_ms.append(1000 * (meter.busy() - cpu0) / n)
            views, wall = n, time.perf_counter() - t0
    ctray_ms = statistics.median(runs_ms)
    print(
        f"  ctray  shards -> Ray Data -> iterator: {views} views per run ({wall:.1f} s wall), CPU of all processes:"
        f" {ctray_ms:.2f} ms/view, median of {repeats} runs, spread {100 * spread(runs_ms):.0f}%",
        flush=True,
    )

    dev = one_core(partial(_device_views, m, patch, 2), 3)
    device_ms = 1000 * dev["cpu_s"] / dev["result"]
    print(
        "  ctray  view augmentation, batched torch on one CPU core (runs on the GPU in training):"
        f" {device_ms:.2f} ms/view",
        flush=True,
    )
    monai = one_core(partial(_monai_ctfm_chain, path, m, patch), 2)
    monai_ms = 1000 * monai["cpu_s"] / monai["result"]
    print(
        f"  CT-FM  MONAI per-step chain, 1 core: {monai['cpu_s']:.2f} s CPU for {monai['result']} views"
        f" = {monai_ms:.1f} ms CPU/view",
        flush=True,
    )
    ratio = monai_ms / ctray_ms
    ratios = [monai_ms / r for r in runs_ms]
    ratio_cpu_only = monai_ms / (ctray_ms + device_ms)
    print(
        f"CPU time per view: ctray {ctray_ms:.2f} ms vs CT-FM {monai_ms:.1f} ms -> {ratio:.0f}x less "
        f"(spread {100 * spread(ratios):.0f}% over {repeats} runs; target >= 50x); "
        f"with the augmentation also on CPU: {ratio_cpu_only:.1f}x"
    )
    figures = {
        "bench": "data",
        "shape_zyx": list(shape),
        "spacing_zyx": list(spacing),
        "patches_per_scan": m,
        "patch_size": list(patch),
        "ctray_cpu_ms_per_view": round(ctray_ms, 3),
        "ctray_views": views,
        "ctray_wall_s": round(wall, 2),
        "augment_cpu_ms_per_view": round(device_ms, 3),
        "ctfm_monai_cpu_ms_per_view": round(monai_ms, 2),
        "ratio": round(ratio, 1),
        "ratio_spread": round(spread(ratios), 3),
        "ctray_cpu_ms_per_view_runs": [round(r, 3) for r in runs_ms],
        "ratio_with_cpu_augmentation": round(ratio_cpu_only, 2),
    }
    print(json.dumps(figures))
    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return figures
