"""`ctray bench data --objective X`: the CPU each scan costs the training data feed, by stage, at
the paper's sampler settings, the cores per GPU that makes at the GPU target, and the bytes per
second from storage; for CT-FM also against its per-step MONAI chain on the same scan.

The inputs: one clinical-size phantom with its label map and report, copied to `scans` rows and
ingested once per shard codec (not timed: paid once per data set, see `bench ingest`). Stages (read,
sample) on one core: bench/feed.py. The whole pipeline (`training_datasets`: shard row groups ->
the objective's sampler in Ray Data map tasks -> streaming split -> iter_torch_batches) on a local
Ray started by this process: its CPU time is that of this process and its descendants (the
consuming driver, Ray's workers, its split coordinator, raylet, GCS and helpers: common.TreeCpu),
not the machine's, so other processes' CPU does not land in it (though sharing the cores and caches
with them slows ours: the last line says how busy they kept the cores). Untimed runs start Ray's
workers, fill the page cache and size the dataset so that one execution of it (a timed run) takes
about `seconds` of wall time; `repeats` timed runs follow (for CT-FM each followed by one of
MONAI's, so that run i of each sees the same machine and the ratio's spread is taken over pairs).
The work the recipes do on the device (CT-FM's views, CA-GCL's window and token masks) is not in
these figures; on a CPU-only machine it lands on the CPU: CT-FM's is printed separately. Where a
feed misses CORES_PER_GPU_GOAL, the pipeline runs once more with StoredBytes in place of the
sampler: what the host would still pay if the GPU decoded and sampled each scan's stored bytes.

CT-FM's MONAI chain: LoadImage, Orientation SPL, Spacing 3x1x1, intensity window, crop foreground,
pad, M random patches, then per patch two views of random resized crop + flip + histogram shift +
Gaussian smoothing, in one process with one thread (what each of CT-FM's loader workers does per
step): an untimed scan, then `repeats` runs of as many scans as fill `seconds` each (common.OneCore).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ctray.bench.common import ROLES, OneCore, OtherLoad, TreeCpu, clinical_phantom, one_core, spread, summary
from ctray.bench.feed import CORES_PER_GPU_GOAL, cores_per_gpu, dump, feed_line, feed_sampler, stage_figures

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


class StoredBytes:
    """A stand-in sampler (WritesInto) for a feed that ships each scan's stored bytes to the GPU,
    to be decompressed and sampled there (nvCOMP), instead of its sampled arrays: each draw copies
    `size` bytes of the file at `path` (in the page cache) into its block row, as reading the
    scan's stored column chunks would. Module-level: Ray Data's task processes unpickle it."""

    columns = ("shape",)  # the smallest column: each draw still opens its scan's row group

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size
        self.bulk = {"stored": ((size,), np.uint8)}
        self.draw_bytes = size

    def __call__(
        self, batch: Any, rng: np.random.Generator, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        stored = np.empty((1, self.size), np.uint8) if out is None else out["stored"]
        with open(self.path, "rb", buffering=0) as f:
            if f.readinto(memoryview(stored[0])) != self.size:
                raise ValueError(f"{self.path} holds fewer than {self.size} bytes")
        return {"stored": stored}


def _ms_per_scan(runs: list[dict[str, Any]]) -> list[float]:
    """CPU ms per scan of each pipeline run, all its processes together."""
    return [1000 * sum(r["cpu_s"].values()) / r["scans"] for r in runs]


class _CtrayPipeline:
    """The training pipeline over the shards with `sampler`, warmed up and sized on construction;
    each run() is one timed execution: scans, wall seconds, CPU seconds by process group (TreeCpu)
    and how many processes exited."""

    def __init__(self, shards: str, sampler: Any, scans: int, seconds: float, node_cache: str | None = None):
        import ray

        from ctray.config import StorageConfig
        from ctray.data.pipeline import StreamPlan, training_datasets

        self.meter = TreeCpu()
        if not self.meter.has_ray():
            print("  warning: Ray runs outside this process tree; its processes' CPU is not counted", flush=True)
        ray.data.DataContext.get_current().enable_progress_bars = False

        def dataset(passes: int) -> ray.data.DataIterator:
            plan = StreamPlan(seed=0, steps=passes * scans, node_cache=node_cache)
            return training_datasets(shards, StorageConfig(), sampler, plan)["train_0"]

        # Untimed warm-up and sizing. The first execution of each dataset also starts its
        # coordinator actor, so each is timed on its second execution: one pass and four passes over
        # the rows give the wall time per pass and per execution, which size the timed dataset to
        # about `seconds`. All stay referenced, so no coordinator exits during a timed run.
        self.datasets = [dataset(1), dataset(4)]
        walls = []
        for it in self.datasets:
            self._run(it)
            walls.append(self._run(it)["wall_s"])
        per_pass = max((walls[1] - walls[0]) / 3, walls[1] / 8)
        passes = max(1, math.ceil((seconds - max(0.0, walls[0] - per_pass)) / per_pass))
        # Where a pass is a block or two, or the warm-up ran slow, that estimate is coarse (runs of
        # a third of `seconds` were seen): the sized dataset's own first execution re-sizes it.
        for _ in range(3):
            self.datasets.append(dataset(passes))
            wall = self._run(self.datasets[-1])["wall_s"]
            if wall >= 0.8 * seconds:
                break
            passes = max(passes + 1, math.ceil(passes * seconds / max(wall, 0.1)))

    def _run(self, it: ray.data.DataIterator) -> dict[str, Any]:
        before, t0, scans = self.meter.snapshot(), time.perf_counter(), 0
        for batch in it.iter_torch_batches(batch_size=2, prefetch_batches=2):
            scans += len(next(iter(batch.values())))
        wall = time.perf_counter() - t0
        cpu, gone = self.meter.delta(before, self.meter.snapshot())
        return {"scans": scans, "wall_s": wall, "cpu_s": cpu, "exited": gone}

    def run(self) -> dict[str, Any]:
        return self._run(self.datasets[-1])


def _inputs(root: str, shape: tuple[int, int, int], spacing: tuple[float, float, float], scans: int) -> str:
    """`scans` copies (links) of one clinical-size phantom, its label map and its report, as ingest
    inputs in <root>/bench-data-inputs-<scans>; returns the scan file's path."""
    path = clinical_phantom(root, shape, spacing)
    inputs = os.path.join(root, f"bench-data-inputs-{scans}")
    with open(path.replace(".nii.gz", ".json")) as f:
        report = json.load(f)["report"]
    for sub, src in (("scans", path), ("masks", path.replace(".nii.gz", ".mask.nii.gz"))):
        os.makedirs(os.path.join(inputs, sub), exist_ok=True)
        for i in range(scans):
            link = os.path.join(inputs, sub, f"copy{i:03d}.nii.gz")
            if not os.path.exists(link):
                os.symlink(os.path.abspath(src), link)
    with open(os.path.join(inputs, "reports.jsonl"), "w") as f:
        for i in range(scans):
            f.write(json.dumps({"scan_id": f"copy{i:03d}", "report": report}) + "\n")
    return inputs


def _shards(root: str, inputs: str, scans: int, codec: str) -> str:
    """The inputs ingested (once) with `codec` for the volume and label map."""
    from ctray.config import load_config
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest

    shards = os.path.join(root, f"bench-data-shards-{scans}-{codec}")
    print(f"ingesting {scans} copies of the scan with bulk_codec {codec} (not timed; resumed) ...", flush=True)
    overrides = [f"input.{k}={inputs}/{k}" for k in ("scans", "masks")]
    overrides += [f"input.reports={inputs}/reports.jsonl", f"output.uri={shards}", "output.scans_per_shard=4"]
    result = run_ingest(load_config(IngestConfig, None, [*overrides, f"output.bulk_codec={codec}"]))
    if result.quarantined:
        raise RuntimeError(f"ingest quarantined {result.quarantined} of the benchmark's scans: see {shards}")
    return shards


def bench_data(
    objective: str,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    scans: int,
    seconds: float,
    repeats: int,
    workdir: str | None,
    codecs: Sequence[str] = ("lz4",),
) -> dict:
    import ray

    from ctray.objectives import get_objective

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-")
        workdir = tmp.name
    root = workdir
    rate = get_objective(objective).bench.feed_views_per_s
    inputs = _inputs(root, shape, spacing, scans)
    if not ray.is_initialized():  # a Ray of our own, whose processes are our descendants
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    figures: dict[str, Any] = {"bench": "data", "objective": objective, "shape_zyx": list(shape)}
    figures["spacing_zyx"], figures["codecs"] = list(spacing), {}
    other = OtherLoad()
    for codec in codecs:
        shards = _shards(root, inputs, scans, codec)
        sampler = feed_sampler(objective, shards, root)  # first here: a cache it needs is cut on this Ray
        stages = stage_figures(objective, shards, root, repeats, seconds)
        pipeline = _CtrayPipeline(shards, sampler, scans, seconds)
        runs = [pipeline.run() for _ in range(repeats)]
        if objective == "ctfm_simclr" and codec == codecs[0]:
            figures["ctfm_monai"] = _against_monai(root, shape, spacing, sampler, runs, pipeline, repeats, seconds)
        del pipeline
        runs_ms = _ms_per_scan(runs)
        by_role = {k: statistics.median(1000 * r["cpu_s"][k] / r["scans"] for r in runs) for k in ROLES}
        exited = sum(r["exited"] for r in runs)
        print(
            f"  {objective} [{codec}] shards -> Ray Data -> iterator: {repeats} runs of {runs[0]['scans']} scans"
            f" ({statistics.median(r['wall_s'] for r in runs):.1f} s wall each): CPU of this process tree"
            f" {statistics.median(runs_ms):.1f} ms/scan (runs {' '.join(f'{v:.1f}' for v in runs_ms)}, spread"
            f" {100 * spread(runs_ms):.0f}%); by process, ms/scan: "
            + ", ".join(f"{k} {v:.1f}" for k, v in by_role.items())
            + (f"; {exited} processes exited during the runs (counted once reaped)" if exited else ""),
            flush=True,
        )
        line = feed_line(objective, codec, stages, statistics.median(runs_ms), rate)
        line["pipeline_ms_per_scan_runs"] = [round(v, 2) for v in runs_ms]
        line["pipeline_ms_per_scan_spread"] = round(spread(runs_ms), 3)
        line["pipeline_ms_per_scan_by_process"] = {k: round(v, 2) for k, v in by_role.items()}
        if codec == codecs[0]:
            line["node_cache"] = _with_node_cache(root, shards, sampler, scans, seconds, repeats, stages)
        if codec == codecs[0] and line["cores_per_gpu_at_target"] > CORES_PER_GPU_GOAL:
            line["stored_bytes_only"] = _stored_bytes_only(root, shards, scans, seconds, repeats, stages, rate)
        figures["codecs"][codec] = line
    figures["other_load_cores"] = round(other.cores(), 2)
    print(f"other processes kept {figures['other_load_cores']:.1f} of {os.cpu_count()} cores busy during the runs")
    dump(figures)
    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return figures


def _with_node_cache(
    root: str, shards: str, sampler: Any, scans: int, seconds: float, repeats: int, stages: dict[str, Any]
) -> dict[str, Any]:
    """The pipeline again with data.node_cache on (a fresh folder): its CPU per scan, and the bytes
    fetched from the shard set's storage per view, against reading each draw's columns from it."""
    from ctray.data.node_cache import fetched

    folder = tempfile.mkdtemp(prefix="node-cache-", dir=root)
    pipeline = _CtrayPipeline(shards, sampler, scans, seconds, node_cache=folder)
    warm = sum(f["bytes"] for node in fetched(folder).values() for f in node)
    runs = [pipeline.run() for _ in range(repeats)]
    del pipeline
    runs_ms = _ms_per_scan(runs)
    views = sum(r["scans"] for r in runs) * stages["views_per_scan"]
    timed = sum(f["bytes"] for node in fetched(folder).values() for f in node) - warm
    shutil.rmtree(folder, ignore_errors=True)
    without = 1e6 * stages["stored_mb_per_scan"] / stages["views_per_scan"]
    out = {
        "pipeline_ms_per_scan": round(statistics.median(runs_ms), 2),
        "pipeline_ms_per_scan_runs": [round(v, 2) for v in runs_ms],
        "fetched_bytes_per_view_timed": round(timed / views, 1),
        "fetched_bytes_warm_up": warm,
        "fetched_bytes_per_view_without": round(without),
    }
    print(
        f"  with data.node_cache: whole pipeline {out['pipeline_ms_per_scan']:.1f} ms CPU/scan (runs "
        + " ".join(f"{v:.1f}" for v in runs_ms)
        + f"); fetched from storage: {warm / 1e6:.1f} MB while warming up (each shard once), then"
        f" {timed / views:,.0f} bytes per view over {repeats} runs, against {without:,.0f} bytes per view"
        " without it (each draw's columns)",
        flush=True,
    )
    return out


def _stored_bytes_only(
    root: str, shards: str, scans: int, seconds: float, repeats: int, stages: dict[str, Any], rate: float
) -> dict[str, Any]:
    """Where the feed misses the goal: the pipeline again with StoredBytes in place of the sampler
    (the stored bytes the sampler reads per scan), its CPU per scan and the cores per GPU that makes
    at the target: the host's share of a feed that decodes and samples on the GPU, which a CPU
    cannot run."""
    size = round(stages["stored_mb_per_scan"] * 1e6)
    path = os.path.join(root, f"stored-bytes-{size}.bin")
    np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tofile(path)  # as incompressible as lz4's
    pipeline = _CtrayPipeline(shards, StoredBytes(path, size), scans, seconds)
    runs_ms = _ms_per_scan([pipeline.run() for _ in range(repeats)])
    del pipeline
    ms = statistics.median(runs_ms)
    cores = cores_per_gpu(ms, rate, stages["views_per_scan"])
    print(
        f"  shipping each scan's stored bytes instead ({size / 1e6:.1f} MB, to be decoded and sampled on the GPU;"
        " a stand-in sampler copies them from the page cache into the block): whole pipeline"
        f" {ms:.1f} ms CPU/scan (runs {' '.join(f'{v:.1f}' for v in runs_ms)}), {cores:.2f} cores per GPU at"
        " the target",
        flush=True,
    )
    return {
        "pipeline_ms_per_scan": round(ms, 2),
        "pipeline_ms_per_scan_runs": [round(v, 2) for v in runs_ms],
        "cores_per_gpu_at_target": round(cores, 2),
    }


def _against_monai(
    root: str,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    sampler: Any,
    runs: list[dict[str, Any]],
    pipeline: _CtrayPipeline,
    repeats: int,
    seconds: float,
) -> dict[str, Any]:
    """CT-FM: CPU per view of `runs` (ctray's pipeline) against MONAI's per-step chain on the same
    scan, run i of each back to back (the pipeline runs again, alternating), and the view
    augmentation that training runs on the GPU, on one CPU core."""
    m, patch = sampler.m, tuple(sampler.size)
    path = clinical_phantom(root, shape, spacing)
    monai_proc = OneCore(partial(_monai_ctfm_chain, path, m, patch))  # after its untimed warm-up scan
    paired, monai_calls = [], []
    for _ in range(repeats):
        paired.append(pipeline.run())
        monai_calls.append(monai_proc.run(seconds))
    monai = summary(monai_calls, monai_proc.close())
    views = 2 * m
    runs_ms = [1000 * sum(r["cpu_s"].values()) / (r["scans"] * views) for r in paired]
    ctray_ms = statistics.median(runs_ms)
    monai_runs = [1000 * c / monai["result"] for c in monai["cpu_s_runs"]]
    monai_ms = statistics.median(monai_runs)
    dev = one_core(partial(_device_views, m, patch, 2), repeats, seconds)
    device_ms = 1000 * dev["cpu_s"] / dev["result"]
    ratios = [mo / ct for mo, ct in zip(monai_runs, runs_ms, strict=True)]  # run i of each, back to back
    print(
        f"  CT-FM  MONAI per-step chain, 1 core: {repeats} runs of {monai['calls_per_run']} scans x"
        f" {monai['result']} views: {monai_ms:.1f} ms CPU/view (median; runs "
        + " ".join(f"{v:.1f}" for v in monai_runs)
        + f", spread {100 * spread(monai_runs):.0f}%)\n"
        "  ctray  view augmentation, batched torch on one CPU core (runs on the GPU in training):"
        f" {device_ms:.2f} ms/view (median of {repeats} runs, spread {100 * dev['cpu_spread']:.0f}%)\n"
        f"CPU time per view: ctray {ctray_ms:.2f} ms vs CT-FM {monai_ms:.1f} ms -> {monai_ms / ctray_ms:.0f}x less"
        f" (spread {100 * spread(ratios):.0f}% over {repeats} paired runs; target >= 50x); with the augmentation"
        f" also on CPU: {monai_ms / (ctray_ms + device_ms):.1f}x",
        flush=True,
    )
    return {
        "ctray_cpu_ms_per_view": round(ctray_ms, 3),
        "ctray_cpu_ms_per_view_runs": [round(r, 3) for r in runs_ms],
        "augment_cpu_ms_per_view": round(device_ms, 3),
        "monai_cpu_ms_per_view": round(monai_ms, 2),
        "monai_cpu_ms_per_view_runs": [round(r, 2) for r in monai_runs],
        "ratio": round(monai_ms / ctray_ms, 1),
        "ratio_spread": round(spread(ratios), 3),
        "ratio_with_cpu_augmentation": round(monai_ms / (ctray_ms + device_ms), 2),
    }
