"""`ctray bench data`: CPU time per view delivered from shards, vs CT-FM's per-step MONAI chain,
on the same clinical-size volume, in one run.

ctray: the scan is ingested once (not timed: it is paid once per data set, see `bench ingest`),
copied to `scans` rows, and the training pipeline (`training_datasets`: shard row groups ->
PatchSampler map tasks -> streaming split -> iter_torch_batches) on a local Ray started by this
process delivers CT-FM batches of M patches per scan; each patch becomes two views. CPU time is
that of this process and its descendants (the consuming driver, Ray's workers, its split
coordinator, raylet, GCS and helpers: common.TreeCpu), not the machine's, so other processes'
CPU does not land in it (though sharing the cores and caches with them slows ours: the line
printed last says how busy they kept the cores). Untimed runs start Ray's workers, fill the page
cache and size the dataset so that one execution of it (a timed run) takes about `seconds` of wall
time; `repeats` timed runs follow, each followed by one of MONAI's, so that run i of each sees the
same machine and the ratio's spread is taken over these pairs.
The views themselves are made from the patches on the training device (GPU); on a CPU-only
machine that work lands on the CPU as well, so it is measured and printed separately.

CT-FM: LoadImage, Orientation SPL, Spacing 3x1x1, intensity window, crop foreground, pad, M random
patches, then per patch two views of random resized crop + flip + histogram shift + Gaussian
smoothing, in one process with one thread (what each of CT-FM's loader workers does per step):
an untimed scan, then `repeats` runs of as many scans as fill `seconds` each (common.OneCore).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ctray.bench.common import ROLES, OneCore, OtherLoad, TreeCpu, clinical_phantom, one_core, spread, summary

if TYPE_CHECKING:
    import ray.data

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


class _CtrayPipeline:
    """The training pipeline over the shards, warmed up and sized on construction; each run() is
    one timed execution: views, wall seconds, CPU seconds by process group (TreeCpu) and how many
    processes exited."""

    def __init__(self, shards: str, m: int, patch: tuple[int, int, int], scans: int, seconds: float):
        import ray

        from ctray.config import StorageConfig
        from ctray.data.pipeline import StreamPlan, training_datasets
        from ctray.objectives.ctfm.sampler import PatchSampler

        self.meter = TreeCpu()
        if not self.meter.has_ray():
            print("  warning: Ray runs outside this process tree; its processes' CPU is not counted", flush=True)
        ray.data.DataContext.get_current().enable_progress_bars = False

        def dataset(passes: int) -> ray.data.DataIterator:
            sampler = PatchSampler(m, patch)
            return training_datasets(shards, StorageConfig(), sampler, StreamPlan(seed=0, steps=passes * scans))[
                "train_0"
            ]

        # Untimed warm-up and sizing. The first execution of each dataset also starts its
        # coordinator actor, so each is timed on its second execution: one pass and four passes over
        # the rows give the wall time per pass and per execution, which size the timed dataset to
        # about `seconds`. All three stay referenced, so no coordinator exits during a timed run.
        self.datasets = [dataset(1), dataset(4)]
        walls = []
        for it in self.datasets:
            self._run(it)
            walls.append(self._run(it)["wall_s"])
        per_pass = max((walls[1] - walls[0]) / 3, walls[1] / 8)
        self.datasets.append(dataset(max(1, math.ceil((seconds - max(0.0, walls[0] - per_pass)) / per_pass))))
        self._run(self.datasets[-1])

    def _run(self, it: ray.data.DataIterator) -> dict[str, Any]:
        before, t0, views = self.meter.snapshot(), time.perf_counter(), 0
        for batch in it.iter_torch_batches(batch_size=2, prefetch_batches=2):
            views += 2 * batch["patches"].shape[0] * batch["patches"].shape[1]
        wall = time.perf_counter() - t0
        cpu, gone = self.meter.delta(before, self.meter.snapshot())
        return {"views": views, "wall_s": wall, "cpu_s": cpu, "exited": gone}

    def run(self) -> dict[str, Any]:
        return self._run(self.datasets[-1])


def bench_data(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    m: int,
    patch: tuple[int, int, int],
    scans: int,
    seconds: float,
    repeats: int,
    workdir: str | None,
) -> dict:
    import ray

    from ctray.config import load_config
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest

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
    if not ray.is_initialized():  # a Ray of our own, whose processes are our descendants
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    print(f"ingesting {scans} copies of the scan (once, not timed) ...", flush=True)
    run_ingest(
        load_config(IngestConfig, None, [f"input.scans={scan_dir}", f"output.uri={shards}", "output.scans_per_shard=4"])
    )

    # ctray's and MONAI's timed runs alternate, so that run i of each sees the same machine.
    monai_proc = OneCore(partial(_monai_ctfm_chain, path, m, patch))  # after its untimed warm-up scan
    pipeline = _CtrayPipeline(shards, m, patch, scans, seconds)
    runs, monai_calls, other = [], [], OtherLoad()
    for _ in range(repeats):
        runs.append(pipeline.run())
        monai_calls.append(monai_proc.run(seconds))
    other_cores = other.cores()
    del pipeline
    monai = summary(monai_calls, monai_proc.close())
    runs_ms = [1000 * sum(r["cpu_s"].values()) / r["views"] for r in runs]
    ctray_ms = statistics.median(runs_ms)
    by_role = {k: statistics.median(1000 * r["cpu_s"][k] / r["views"] for r in runs) for k in ROLES}
    exited = sum(r["exited"] for r in runs)
    print(
        f"  ctray  shards -> Ray Data -> iterator: {repeats} runs of {runs[0]['views']} views"
        f" ({statistics.median(r['wall_s'] for r in runs):.1f} s wall each), CPU of this process tree:"
        f" {ctray_ms:.2f} ms/view (median; runs {' '.join(f'{v:.2f}' for v in runs_ms)}, spread"
        f" {100 * spread(runs_ms):.0f}%)\n"
        f"         by process, ms/view: {', '.join(f'{k} {v:.2f}' for k, v in by_role.items())}"
        + (f"; {exited} processes exited during the runs (counted once reaped)" if exited else ""),
        flush=True,
    )

    monai_runs = [1000 * c / monai["result"] for c in monai["cpu_s_runs"]]
    monai_ms = statistics.median(monai_runs)
    print(
        f"  CT-FM  MONAI per-step chain, 1 core: {repeats} runs of {monai['calls_per_run']} scans x"
        f" {monai['result']} views: {monai_ms:.1f} ms CPU/view (median;"
        f" runs {' '.join(f'{v:.1f}' for v in monai_runs)}, spread {100 * spread(monai_runs):.0f}%)",
        flush=True,
    )
    dev = one_core(partial(_device_views, m, patch, 2), repeats, seconds)
    device_ms = 1000 * dev["cpu_s"] / dev["result"]
    print(
        "  ctray  view augmentation, batched torch on one CPU core (runs on the GPU in training):"
        f" {device_ms:.2f} ms/view (median of {repeats} runs, spread {100 * dev['cpu_spread']:.0f}%)",
        flush=True,
    )
    ratio = monai_ms / ctray_ms
    ratios = [mo / ct for mo, ct in zip(monai_runs, runs_ms, strict=True)]  # run i of each, back to back
    ratio_cpu_only = monai_ms / (ctray_ms + device_ms)
    print(
        f"CPU time per view: ctray {ctray_ms:.2f} ms vs CT-FM {monai_ms:.1f} ms -> {ratio:.0f}x less "
        f"(spread {100 * spread(ratios):.0f}% over {repeats} paired runs; target >= 50x); "
        f"with the augmentation also on CPU: {ratio_cpu_only:.1f}x; other processes kept {other_cores:.1f} of"
        f" {os.cpu_count()} cores busy during the timed runs"
    )
    figures = {
        "bench": "data",
        "shape_zyx": list(shape),
        "spacing_zyx": list(spacing),
        "patches_per_scan": m,
        "patch_size": list(patch),
        "ctray_cpu_ms_per_view": round(ctray_ms, 3),
        "ctray_cpu_ms_per_view_runs": [round(r, 3) for r in runs_ms],
        "ctray_cpu_ms_per_view_by_process": {k: round(v, 3) for k, v in by_role.items()},
        "ctray_views_per_run": runs[0]["views"],
        "ctray_wall_s_runs": [round(r["wall_s"], 2) for r in runs],
        "ctray_processes_exited": exited,
        "augment_cpu_ms_per_view": round(device_ms, 3),
        "ctfm_monai_cpu_ms_per_view": round(monai_ms, 2),
        "ctfm_monai_cpu_ms_per_view_runs": [round(r, 2) for r in monai_runs],
        "ratio": round(ratio, 1),
        "ratio_spread": round(spread(ratios), 3),
        "ratio_with_cpu_augmentation": round(ratio_cpu_only, 2),
        "other_load_cores": round(other_cores, 2),
    }
    print(json.dumps(figures))
    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return figures
