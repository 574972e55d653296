"""What `ctray bench data` measures for any objective: the CPU each scan costs the data feed, by
stage, at the paper's sampler settings, and the cores per GPU that makes at the GPU target.

Stages, on one core in a fresh process (common.OneCore), over every row of the shards: "read" is
pyarrow reading the scan's row group (the sampler's columns: I/O from the page cache and the
column codec's decompression), "sample" the objective's CPU sampler on it. The whole pipeline
(shard rows -> Ray Data map tasks -> streaming split -> iterator, as training runs it) is timed
by bench/data.py; what it costs beyond read + sample is Ray Data's and the object store's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ctray.train.config import PretrainConfig

GPUS_PER_NODE = 8
"""A p5.48xlarge (8 H100s, 192 vCPUs: about 12 physical cores per GPU, shared with Ray, the
training process and the object store): the node the bytes-per-second figure is for."""


@contextlib.contextmanager
def _bucket(root: str) -> Iterator[None]:
    """The paper jobs spell their locations ${CTRAY_BUCKET}/...: here, the benchmark's folder."""
    saved = os.environ.get("CTRAY_BUCKET")
    os.environ["CTRAY_BUCKET"] = root
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CTRAY_BUCKET", None)
        else:
            os.environ["CTRAY_BUCKET"] = saved


def feed_config(objective: str, shards: str, root: str) -> PretrainConfig:
    """The objective's paper job (BenchProfile.paper_job) on `shards`, offline: no hub model (a
    tokenizer trained on the shards' reports instead of the hub's), no ViT or stage-1 init."""
    from ctray.config import load_config
    from ctray.objectives import get_objective
    from ctray.quickstart import job_yaml
    from ctray.train.config import PretrainConfig

    profile = get_objective(objective).bench
    if not profile.paper_job:
        raise ValueError(f"objective {objective} names no paper job (BenchProfile.paper_job) to sample with")
    overrides = [f"data.shards={shards}", f"run.storage={root}/bench-data-runs", f"run.name=bench-data-{objective}"]
    with _bucket(root):
        cfg = load_config(PretrainConfig, job_yaml(profile.paper_job), overrides)
    offline: dict[str, Any] = {k: None for k in ("vit_init", "init_from") if hasattr(cfg.objective, k)}
    if hasattr(cfg.objective, "text"):
        offline["text"] = cfg.objective.text.model_copy(update={"model": None, "tokenizer_min_patients": 1})
    return cfg.model_copy(update={"objective": cfg.objective.model_copy(update=offline)})


def feed_sampler(objective: str, shards: str, root: str) -> Any:
    """The objective's training sampler at its paper settings (feed_config), assets prepared."""
    from ctray.objectives import get_objective

    cfg = feed_config(objective, shards, root)
    spec = get_objective(objective)
    return spec.sampler(cfg.objective, spec.prepare(cfg.objective, shards, cfg.run_folder()))


def views_per_scan(out: dict[str, np.ndarray]) -> float:
    """Views of one scan in a sampler's output, as the GPU target counts them: CT-FM two views per
    patch, TotalFM one per organ volume present, CA-GCL the scan."""
    if "patches" in out:
        return 2.0 * out["patches"].shape[1]
    if "organs" in out:
        return float(out["region"].sum()) / len(out["region"])
    return 1.0


def _stage_closure(objective: str, shards: str, root: str) -> Any:
    """OneCore factory: one call reads and samples every row of `shards` once; returns the CPU
    seconds per scan of each stage (common.Staged), with the views per scan and the stored bytes
    per scan it read."""
    import pyarrow.fs as pafs

    from ctray.bench.common import Staged
    from ctray.config import StorageConfig
    from ctray.data.pipeline import RowGroups
    from ctray.ingest.shardset import ShardSet

    sampler = feed_sampler(objective, shards, root)  # its cache, if any, was cut by the caller
    rows = ShardSet.open(shards, StorageConfig()).scans()
    files = RowGroups(pafs.LocalFileSystem(), keep=len(rows) * 2)

    def run() -> Staged:
        read = sample = views = 0.0
        stored = 0
        for k, row in enumerate(rows):
            t0 = time.process_time()
            table = files.sampler_input(sampler, row.path, row.row_group)
            t1 = time.process_time()
            out = sampler(table, np.random.default_rng(k))
            t2 = time.process_time()
            read, sample, views = read + t1 - t0, sample + t2 - t1, views + views_per_scan(out)
            for path, cols in files.sources(sampler, row.path):  # the compressed column chunks it read
                meta = files.file(path).metadata.row_group(row.row_group)
                stored += sum(
                    meta.column(i).total_compressed_size
                    for i in range(meta.num_columns)
                    if meta.column(i).path_in_schema.split(".")[0] in cols
                )
        n = len(rows)
        return Staged(
            {"views_per_scan": views / n, "stored_bytes": stored / n}, {"read": read / n, "sample": sample / n}
        )

    return run


def stage_figures(objective: str, shards: str, root: str, repeats: int, seconds: float) -> dict[str, Any]:
    """Median CPU ms per scan of read and sample over `repeats` one-core runs, with their spread."""
    from functools import partial

    from ctray.bench.common import OneCore, spread

    proc = OneCore(partial(_stage_closure, objective, shards, root))
    runs = [proc.run(seconds) for _ in range(repeats)]
    proc.close()
    out: dict[str, Any] = {}
    for stage in ("read", "sample"):  # each run's mean over its passes
        ms = [1000 * r["stages_cpu_s"][stage] for r in runs]
        out[f"{stage}_ms_per_scan"] = float(np.median(ms))
        out[f"{stage}_ms_per_scan_spread"] = spread(ms)
    last = runs[-1]["result"]  # the same rows every pass (OneCore unwraps the Staged)
    out["views_per_scan"] = last["views_per_scan"]
    out["stored_mb_per_scan"] = last["stored_bytes"] / 1e6
    return out


CORES_PER_GPU_GOAL = 4
"""Cores of a GPU node's CPU one GPU's data feed may take at its target (a third of a p5's ~12
physical cores per GPU: the rest run Ray, the training process and the object store)."""


def cores_per_gpu(ms_per_scan: float, views_per_s: float, views_per_scan: float) -> float:
    """CPU cores one GPU's feed takes at `views_per_s`, at `ms_per_scan` of CPU per scan."""
    return ms_per_scan / 1000 * views_per_s / views_per_scan


def feed_line(objective: str, codec: str, stages: dict[str, Any], pipeline_ms: float, rate: float) -> dict[str, Any]:
    """The printed figures of one objective and codec: per stage and in all, and what they make at
    the target: cores per GPU, and bytes per second per 8-GPU node from storage."""
    per_scan_rate = rate / stages["views_per_scan"]
    fig = {
        "objective": objective,
        "codec": codec,
        **{k: round(v, 3) for k, v in stages.items()},
        "pipeline_ms_per_scan": round(pipeline_ms, 2),
        "ray_data_ms_per_scan": round(pipeline_ms - stages["read_ms_per_scan"] - stages["sample_ms_per_scan"], 2),
        "scans_per_s_per_gpu_at_target": round(per_scan_rate, 1),
        "cores_per_gpu_at_target": round(cores_per_gpu(pipeline_ms, rate, stages["views_per_scan"]), 2),
        "storage_gb_per_s_per_node_at_target": round(
            stages["stored_mb_per_scan"] * per_scan_rate * GPUS_PER_NODE / 1000, 2
        ),
    }
    print(
        f"  {objective} [{codec}] per scan ({stages['views_per_scan']:g} views): read"
        f" {stages['read_ms_per_scan']:.1f} ms (spread {100 * stages['read_ms_per_scan_spread']:.0f}%), sample"
        f" {stages['sample_ms_per_scan']:.1f} ms (spread {100 * stages['sample_ms_per_scan_spread']:.0f}%), Ray Data"
        f" + object store {fig['ray_data_ms_per_scan']:.1f} ms; whole pipeline {pipeline_ms:.1f} ms CPU/scan\n"
        f"  at the target ({rate:g} views/s = {per_scan_rate:.0f} scans/s per GPU): "
        f"{fig['cores_per_gpu_at_target']:.2f} cores per GPU (goal <= {CORES_PER_GPU_GOAL}),"
        f" {stages['stored_mb_per_scan']:.1f} MB"
        f" stored per scan = {fig['storage_gb_per_s_per_node_at_target']:.1f} GB/s per {GPUS_PER_NODE}-GPU node"
        " from storage",
        flush=True,
    )
    return fig


def dump(figures: dict[str, Any]) -> None:
    print(json.dumps(figures))
