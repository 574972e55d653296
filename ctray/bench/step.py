"""`ctray bench step`: views/s and achieved TFLOP/s of an objective's training step through the
real trainer (Ray Train + DeepSpeed), synthetic in-memory input vs streaming from shards, in one
run; prints the data-stall fraction.

FLOPs per view are counted once per run with torch's FlopCounterMode over the task's forward +
backward on a one-scan synthetic batch (device augmentation and the text tower included), so the
figure does not depend on the hardware: ctray.train.metrics.flops_per_view, the count each training
run makes for its reports' TFLOP/s and MFU and logs with its workers; the bench reads it back from
metrics.jsonl, with the windows' MFU (median) and the run's peak GPU memory.

Each run logs 6 windows of steps/6 steps; the first (start-up: Ray
Train, DeepSpeed, Ray Data's first blocks) is left out and the other 5 are repeated measurements of
the steady state: median and spread of each mode's views/s, and of streaming/synthetic over
paired windows (window i of one against window i of the other). views/s is wall-clock: other load
on the machine lowers it, so each run also prints how many cores processes outside this process
tree kept busy (when Ray runs locally, in this tree).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from ctray.bench.common import OtherLoad, spread


def _steady(log: list[dict], log_every: int) -> dict:
    """Median and spread over the logging windows after the first (start-up): each window is one
    repeated measurement of the same steady state (a shorter last window is left out too). MFU is
    None where the run had no peak to divide by (CPU, an unlisted GPU); peak memory is the run's."""
    windows = [m for m in log if "loss" in m and m["step"] % log_every == 0][1:]
    if len(windows) < 3:
        raise RuntimeError("fewer than 3 steady-state windows: raise --steps or lower train.log_every")
    rates = [m["views_per_s"] for m in windows]
    mfu = [m["mfu"] for m in windows if m.get("mfu") is not None]
    memory = [m["peak_memory_gib"] for m in windows if m.get("peak_memory_gib") is not None]
    return {
        "views_per_s": statistics.median(rates),
        "views_per_s_spread": spread(rates),
        "views_per_s_windows": rates,
        "data_wait_fraction": statistics.median(m["data_wait_fraction"] for m in windows),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_gib": max(memory) if memory else None,
        "windows": len(windows),
    }


def _rounded(v: Any) -> Any:
    if isinstance(v, list):
        return [round(x, 4) for x in v]
    return v if v is None else round(v, 4)


def bench_step(
    objective: str,
    config: str | None,
    overrides: list[str],
    steps: int,
    scans: int,
    workdir: str | None,
    modes: Sequence[str] = ("synthetic", "streaming"),
) -> dict:
    import ray

    from ctray.config import load_config
    from ctray.data.phantoms import write_dataset
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest
    from ctray.objectives import get_objective
    from ctray.quickstart import job_yaml
    from ctray.train.config import PretrainConfig
    from ctray.train.trainer import run_pretrain

    gpu = torch.cuda.is_available()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-")
        workdir = tmp.name
    root = workdir
    profile = get_objective(objective).bench
    if config is None:
        config = job_yaml(profile.local_job)
        defaults = list(profile.paper_size) if gpu else []
        machine = (
            ["scaling.num_workers=1", "scaling.use_gpu=true", "scaling.cpus_per_worker=2"]
            if gpu
            else ["scaling.num_workers=1", "data.scans_per_batch=2", "scaling.cpus_per_worker=1"]
        )
        overrides = [*defaults, *machine, *overrides]
    shards = os.path.join(root, "bench-step-shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        data = os.path.join(root, "bench-step-phantoms")
        size = (120, 320, 320) if gpu else (48, 128, 128)
        print(f"writing {scans} phantoms of {size} and ingesting them ...", flush=True)
        write_dataset(data, scans, seed=5, shape=size, spacing=(2.5, 1.0, 1.0) if gpu else (3.0, 2.5, 2.5))
        run_ingest(
            load_config(
                IngestConfig,
                None,
                [
                    f"input.scans={data}/scans",
                    f"input.masks={data}/masks",
                    f"input.reports={data}/reports.jsonl",
                    f"output.uri={shards}",
                    "output.scans_per_shard=4",
                ],
            )
        )
    log_every = max(1, steps // 6)
    common = [
        f"data.shards={shards}",
        f"run.storage={root}/bench-step-runs",
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        f"train.checkpoint_every={steps}",
        "eval.enabled=false",
    ]
    base = load_config(PretrainConfig, config, [*overrides, *common])
    results = {}
    fpv = 0.0
    for mode in modes:
        cfg = load_config(
            PretrainConfig,
            config,
            [*overrides, *common, f"data.synthetic={mode == 'synthetic'}", f"run.name=step-{mode}-{os.getpid()}"],
        )
        other = OtherLoad(sample_s=1.0)
        run_pretrain(cfg)
        other_cores = other.cores() if other.tree.has_ray() else None  # Ray's own processes are not "other"
        run_dir = os.path.join(root, "bench-step-runs", cfg.run.name)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            log = [json.loads(line) for line in f]
        results[mode] = r = _steady(log, log_every)
        fpv = next(m["gflop_per_view"] for m in log if m.get("event") == "workers") * 1e9  # the run's own count
        r["tflops"] = r["views_per_s"] * fpv / 1e12
        r["other_load_cores"] = other_cores
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\n{base.objective.name} step on {device}: {base.scans_per_worker} scans/worker, "
        f"{base.scaling.num_workers} worker(s), {fpv / 1e9:.1f} GFLOP/view (fwd+bwd)"
    )
    for mode, r in results.items():
        print(
            f"  {mode:9s} {r['views_per_s']:9.1f} views/s (median of {r['windows']} windows of {log_every} steps,"
            f" spread {100 * r['views_per_s_spread']:.0f}%)  {r['tflops']:8.3f} TFLOP/s"
            f"  data-stall {100 * r['data_wait_fraction']:5.1f}%"
            + (f"  MFU {100 * mfu:.1f}%" if (mfu := r["mfu"]) is not None else "")
            + (f"  peak {memory:.1f} GiB" if (memory := r["peak_memory_gib"]) is not None else "")
            + (f"  other processes kept {load:.1f} cores busy" if (load := r["other_load_cores"]) is not None else "")
        )
    figures = {
        "bench": "step",
        "objective": base.objective.name,
        "device": device,
        "gflop_per_view": round(fpv / 1e9, 3),
        "steps_per_window": log_every,
        **{f"{m}_{k}": _rounded(v) for m, r in results.items() for k, v in r.items()},
    }
    if len(results) == 2:
        ratio = results["streaming"]["views_per_s"] / results["synthetic"]["views_per_s"]
        windows = (results["streaming"]["views_per_s_windows"], results["synthetic"]["views_per_s_windows"])
        ratios = [a / b for a, b in zip(*windows, strict=False)]
        figures["streaming_over_synthetic"] = round(ratio, 4)
        figures["streaming_over_synthetic_spread"] = round(spread(ratios), 4)
        print(
            f"streaming / synthetic: {ratio:.3f} (spread {100 * spread(ratios):.0f}% over {len(ratios)} paired windows;"
            " target >= 0.97)"
        )
    print(get_objective(base.objective.name).bench.target)
    print(json.dumps(figures))
    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return figures
