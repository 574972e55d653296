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
import tempfile
import time
from functools import partial

from ctray.bench.common import CpuMeter, clinical_phantom, one_core

WINDOW = (-1024.0, 2048.0)


def _monai_ctfm_chain(path: str, m: int, patch: tuple[int, int, int]):
    from monai.transforms import (
        Compose, CropForeground, EnsureChannelFirst, LoadImage, Orientation, RandFlip, RandGaussianSmooth,
        RandHistogramShift, RandScaleCrop, RandSpatialCropSamples, Resize, ScaleIntensityRange, Spacing, SpatialPad,
    )

    load = Compose([
        LoadImage(image_only=True), EnsureChannelFirst(), Orientation("SPL"), Spacing(pixdim=(3.0, 1.0, 1.0), mode="bilinear"),
        ScaleIntensityRange(WINDOW[0], WINDOW[1], 0.0, 1.0, clip=True), CropForeground(), SpatialPad(patch),
        RandSpatialCropSamples(patch, num_samples=m, random_size=False),
    ])
    side = 0.33 ** (1 / 3)  # crop scale 0.33..1 of the volume
    view = Compose([
        RandScaleCrop(roi_scale=side, max_roi_scale=1.0, random_size=True), Resize(patch, mode="trilinear"),
        RandFlip(prob=0.5, spatial_axis=0), RandHistogramShift(num_control_points=5, prob=0.5), RandGaussianSmooth(prob=0.5),
    ])

    def run():
        patches = load(path)
        return len([view(p) for p in patches for _ in range(2)])

    return run


def _device_views(m: int, patch: tuple[int, int, int], scans: int):
    import torch

    from ctray.objectives.ctfm import CTFMConfig, CTFMTask

    task = CTFMTask(CTFMConfig(patches_per_scan=m, patch_size=patch, init_filters=4, blocks_down=(1,), head_dims=(8,)))
    batch = torch.randint(-1024, 2048, (scans, m, *patch), dtype=torch.int16)
    return lambda: int(task.views(batch).shape[0])


def bench_data(shape, spacing, m: int, patch: tuple[int, int, int], scans: int, epochs: int, workdir: str | None) -> dict:
    import ray

    from ctray.config import StorageConfig, load_config
    from ctray.data.pipeline import training_dataset
    from ctray.data.samplers import PatchSampler
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest

    tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-") if workdir is None else None
    root = workdir or tmp.name
    path = clinical_phantom(root, shape, spacing)
    scan_dir = os.path.join(root, "bench-data-scans")
    os.makedirs(scan_dir, exist_ok=True)
    for i in range(scans):
        link = os.path.join(scan_dir, f"copy{i:03d}.nii.gz")
        if not os.path.exists(link):
            os.symlink(os.path.abspath(path), link)
    shards = os.path.join(root, f"bench-data-shards-{scans}")
    print(f"ingesting {scans} copies of the scan (once, not timed) ...", flush=True)
    run_ingest(load_config(IngestConfig, None, [f"input.scans={scan_dir}", f"output.uri={shards}", "output.scans_per_shard=4"]))

    ds = training_dataset(shards, StorageConfig(), PatchSampler(m, patch), None)
    meter = CpuMeter()
    views = 0
    for epoch in range(epochs + 1):  # the first epoch warms Ray's worker processes up, untimed
        if epoch == 1:
            cpu0, t0 = meter.busy(), time.perf_counter()
        for batch in ds.iter_torch_batches(batch_size=2, prefetch_batches=2):
            if epoch:
                views += 2 * batch["patches"].shape[0] * batch["patches"].shape[1]
    cpu_ctray, wall = meter.busy() - cpu0, time.perf_counter() - t0
    ctray_ms = 1000 * cpu_ctray / views
    print(f"  ctray  shards -> Ray Data -> iterator: {views} views in {wall:.1f} s wall, {cpu_ctray:.1f} CPU s (all processes) = {ctray_ms:.2f} ms CPU/view", flush=True)

    dev = one_core(partial(_device_views, m, patch, 2), 3)
    device_ms = 1000 * dev["cpu_s"] / dev["result"]
    print(f"  ctray  view augmentation, batched torch on one CPU core (runs on the GPU in training): {device_ms:.2f} ms/view", flush=True)
    monai = one_core(partial(_monai_ctfm_chain, path, m, patch), 2)
    monai_ms = 1000 * monai["cpu_s"] / monai["result"]
    print(f"  CT-FM  MONAI per-step chain, 1 core: {monai['cpu_s']:.2f} s CPU for {monai['result']} views = {monai_ms:.1f} ms CPU/view", flush=True)
    ratio = monai_ms / ctray_ms
    ratio_cpu_only = monai_ms / (ctray_ms + device_ms)
    print(f"CPU time per view: ctray {ctray_ms:.2f} ms vs CT-FM {monai_ms:.1f} ms -> {ratio:.0f}x less (target >= 50x); "
          f"with the augmentation also on CPU: {ratio_cpu_only:.1f}x")
    figures = {
        "bench": "data", "shape_zyx": list(shape), "spacing_zyx": list(spacing), "patches_per_scan": m, "patch_size": list(patch),
        "ctray_cpu_ms_per_view": round(ctray_ms, 3), "ctray_views": views, "ctray_wall_s": round(wall, 2),
        "augment_cpu_ms_per_view": round(device_ms, 3), "ctfm_monai_cpu_ms_per_view": round(monai_ms, 2),
        "ratio": round(ratio, 1), "ratio_with_cpu_augmentation": round(ratio_cpu_only, 2),
    }
    print(json.dumps(figures))
    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return figures
