"""`ctray bench step`: views/s and achieved TFLOP/s of an objective's training step through the
real trainer (Ray Train + DeepSpeed), synthetic in-memory input vs streaming from shards with
device augmentation, in one run; prints the data-stall fraction.

FLOPs per view are counted once with torch's FlopCounterMode on the meta device (forward +
backward of the task, augmentation excluded), so the figure does not depend on the hardware.
Steady state excludes the first logging window (start-up, first epoch).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch


def flops_per_view(objective_cfg) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from ctray.objectives import get_objective

    spec = get_objective(objective_cfg.name)
    with torch.device("meta"):
        task = spec.task(objective_cfg)
        batch = spec.synthetic_batch(objective_cfg, 1, torch.device("meta"))
        views = batch["patches"].shape[1] * 2
        x = torch.empty((views, 1, *objective_cfg.patch_size), device="meta")
        with FlopCounterMode(display=False) as counter:
            z = task.head(task.encoder(x))
            z.sum().backward()
    return counter.get_total_flops() / views


def _steady(log: list[dict]) -> dict:
    windows = [m for m in log if "loss" in m][1:]
    if not windows:
        raise RuntimeError("no steady-state window: raise --steps or lower train.log_every")
    return {
        "views_per_s": statistics.mean(m["views_per_s"] for m in windows),
        "data_wait_fraction": statistics.mean(m["data_wait_fraction"] for m in windows),
        "windows": len(windows),
    }


def bench_step(config: str | None, overrides: list[str], steps: int, scans: int, workdir: str | None) -> dict:
    import ray

    from ctray.config import load_config
    from ctray.data.phantoms import write_dataset
    from ctray.ingest.config import IngestConfig
    from ctray.ingest.job import run_ingest
    from ctray.quickstart import job_yaml
    from ctray.train.config import PretrainConfig
    from ctray.train.trainer import run_pretrain

    gpu = torch.cuda.is_available()
    tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-") if workdir is None else None
    root = workdir or tmp.name
    if config is None:
        # GPU: the paper's encoder at the released repo's 32x128x128, 4 scans x 15 patches per worker
        # (DESIGN.md section 6's probe). CPU: the tiny local config, to show the machinery.
        config = job_yaml("ctfm-local.yaml")
        if gpu:
            overrides = ["objective.patches_per_scan=15", "objective.patch_size=[32,128,128]", "objective.init_filters=32",
                         "objective.blocks_down=[1,2,2,4,4]", "objective.head_dims=[256,128]", "data.scans_per_batch=4",
                         "scaling.num_workers=1", "scaling.use_gpu=true", "scaling.cpus_per_worker=2", *overrides]
        else:
            overrides = ["scaling.num_workers=1", "data.scans_per_batch=2", "scaling.cpus_per_worker=1", *overrides]
    base = load_config(PretrainConfig, config, overrides)
    shards = os.path.join(root, "bench-step-shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        data = os.path.join(root, "bench-step-phantoms")
        size = (120, 320, 320) if gpu else (48, 128, 128)
        print(f"writing {scans} phantoms of {size} and ingesting them ...", flush=True)
        write_dataset(data, scans, seed=5, shape=size, spacing=(2.5, 1.0, 1.0) if gpu else (3.0, 2.5, 2.5))
        run_ingest(load_config(IngestConfig, None, [f"input.scans={data}/scans", f"output.uri={shards}", "output.scans_per_shard=4"]))
    log_every = max(1, steps // 6)
    common = [f"data.shards={shards}", f"run.storage={root}/bench-step-runs", f"train.max_steps={steps}",
              f"train.log_every={log_every}", f"train.checkpoint_every={steps}"]
    fpv = flops_per_view(base.objective)
    results = {}
    for mode in ("synthetic", "streaming"):
        cfg = load_config(PretrainConfig, config, [*overrides, *common, f"data.synthetic={mode == 'synthetic'}", f"run.name=step-{mode}-{os.getpid()}"])
        run_pretrain(cfg)
        run_dir = os.path.join(root, "bench-step-runs", cfg.run.name)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            results[mode] = r = _steady([json.loads(line) for line in f])
        r["tflops"] = r["views_per_s"] * fpv / 1e12
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    obj = base.objective
    print(f"\nCT-FM step on {device}: SegResEncoder init_filters={obj.init_filters} blocks={list(obj.blocks_down)}, "
          f"{obj.patches_per_scan} patches of {list(obj.patch_size)} x 2 views, {base.scans_per_worker} scans/worker, "
          f"{base.scaling.num_workers} worker(s), {fpv / 1e9:.1f} GFLOP/view (fwd+bwd)")
    for mode, r in results.items():
        print(f"  {mode:9s} {r['views_per_s']:9.1f} views/s  {r['tflops']:8.3f} TFLOP/s  data-stall {100 * r['data_wait_fraction']:5.1f}%")
    ratio = results["streaming"]["views_per_s"] / results["synthetic"]["views_per_s"]
    print(f"streaming / synthetic: {ratio:.3f} (target >= 0.97); target on one H100: >= 330 views/s")
    figures = {"bench": "step", "device": device, "gflop_per_view": round(fpv / 1e9, 3), "streaming_over_synthetic": round(ratio, 4),
               **{f"{m}_{k}": round(v, 4) for m, r in results.items() for k, v in r.items()}}
    print(json.dumps(figures))
    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return figures
