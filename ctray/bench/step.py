"""`ctray bench step`: views/s and achieved TFLOP/s of an objective's training step through the
real trainer (Ray Train + DeepSpeed), synthetic in-memory input vs streaming from shards, in one
run; prints the data-stall fraction.

FLOPs per view are counted once with torch's FlopCounterMode over the task's forward + backward on
a one-scan synthetic batch (device augmentation and the text tower included), so the figure does
not depend on the hardware. Steady state excludes the first logging window (start-up).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

import torch

# Paper-size models for a GPU (DESIGN.md section 6's probes), tiny local configs for a CPU.
GPU_DEFAULTS = {
    "ctfm_simclr": ("ctfm-local.yaml", [
        "objective.patches_per_scan=15", "objective.patch_size=[32,128,128]", "objective.init_filters=32",
        "objective.blocks_down=[1,2,2,4,4]", "objective.head_dims=[256,128]", "data.scans_per_batch=4"]),
    "totalfm_mae": ("totalfm-mae-local.yaml", [
        "objective.organs.size=[16,160,160]", "objective.organs.margin_mm=10", "objective.model.patch_size=16",
        "objective.model.hidden_size=768", "objective.model.layers=12", "objective.model.heads=12",
        "objective.model.intermediate_size=3072", "objective.model.decoder_hidden_size=384", "objective.model.decoder_layers=4",
        "objective.model.decoder_heads=6", "objective.model.decoder_intermediate_size=1536", "objective.mask_ratio=0.9",
        "data.scans_per_batch=16"]),
    "totalfm_clip": ("totalfm-clip-local.yaml", [
        "objective.init_from=null", "objective.organs.size=[16,160,160]", "objective.model.patch_size=16",
        "objective.model.hidden_size=768", "objective.model.layers=12", "objective.model.heads=12",
        "objective.model.intermediate_size=3072", "objective.text.hidden_size=768", "objective.text.layers=12",
        "objective.text.heads=12", "objective.text.max_length=64", "objective.embed_dim=256", "data.scans_per_batch=8"]),
    "cagcl": ("cagcl-local.yaml", [
        "objective.input_size=[112,256,352]", "objective.patch=[16,16,32]", "objective.width=768", "objective.depth=12",
        "objective.heads=12", "objective.pool_heads=4", "objective.embed_dim=256", "objective.text.hidden_size=768",
        "objective.text.layers=12", "objective.text.heads=12", "objective.text.max_length=64", "objective.text.pooling=cls",
        "data.scans_per_batch=14"]),
}
CPU_DEFAULTS = {name: (yaml, []) for name, (yaml, _) in GPU_DEFAULTS.items()}
TARGETS = {
    "ctfm_simclr": "target on one H100: >= 330 views/s",
    "totalfm_mae": "target on one H100: >= 1,400 views/s (2x transformers' VideoMAE-B probe, 677)",
    "totalfm_clip": "no target",
    "cagcl": "target on one H100: >= 250 TFLOP/s (1.5x the plain SDPA ViT-B probe, 165)",
}


def flops_per_view(spec, objective_cfg, assets: dict, device: torch.device) -> float:
    """Forward + backward FLOPs of the task on a one-scan synthetic batch, per view."""
    from torch.utils.flop_counter import FlopCounterMode

    task = spec.task(objective_cfg, assets).to(device)
    batch = spec.synthetic_batch(objective_cfg, 1, device)
    with FlopCounterMode(display=False) as counter:
        out = task(batch)
        out["loss"].backward()
    return counter.get_total_flops() / float(out["views"])


def _steady(log: list[dict]) -> dict:
    windows = [m for m in log if "loss" in m][1:]
    if not windows:
        raise RuntimeError("no steady-state window: raise --steps or lower train.log_every")
    return {
        "views_per_s": statistics.mean(m["views_per_s"] for m in windows),
        "data_wait_fraction": statistics.mean(m["data_wait_fraction"] for m in windows),
        "windows": len(windows),
    }


def bench_step(objective: str, config: str | None, overrides: list[str], steps: int, scans: int, workdir: str | None,
               modes: list[str] = ("synthetic", "streaming")) -> dict:
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
    tmp = tempfile.TemporaryDirectory(prefix="ctray-bench-") if workdir is None else None
    root = workdir or tmp.name
    if config is None:
        yaml, defaults = (GPU_DEFAULTS if gpu else CPU_DEFAULTS)[objective]
        config = job_yaml(yaml)
        machine = ["scaling.num_workers=1", "scaling.use_gpu=true", "scaling.cpus_per_worker=2"] if gpu else [
            "scaling.num_workers=1", "data.scans_per_batch=2", "scaling.cpus_per_worker=1"]
        overrides = [*defaults, *machine, *overrides]
    shards = os.path.join(root, "bench-step-shards")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        data = os.path.join(root, "bench-step-phantoms")
        size = (120, 320, 320) if gpu else (48, 128, 128)
        print(f"writing {scans} phantoms of {size} and ingesting them ...", flush=True)
        write_dataset(data, scans, seed=5, shape=size, spacing=(2.5, 1.0, 1.0) if gpu else (3.0, 2.5, 2.5))
        run_ingest(load_config(IngestConfig, None, [f"input.scans={data}/scans", f"input.masks={data}/masks",
                                                    f"input.reports={data}/reports.jsonl", f"output.uri={shards}", "output.scans_per_shard=4"]))
    log_every = max(1, steps // 6)
    common = [f"data.shards={shards}", f"run.storage={root}/bench-step-runs", f"train.max_steps={steps}",
              f"train.log_every={log_every}", f"train.checkpoint_every={steps}", "eval.enabled=false"]
    base = load_config(PretrainConfig, config, [*overrides, *common, "run.name=bench-step-flops"])
    spec = get_objective(base.objective.name)
    fpv = flops_per_view(spec, base.objective, spec.prepare(base), torch.device("cuda" if gpu else "cpu"))
    results = {}
    for mode in modes:
        cfg = load_config(PretrainConfig, config, [*overrides, *common, f"data.synthetic={mode == 'synthetic'}", f"run.name=step-{mode}-{os.getpid()}"])
        run_pretrain(cfg)
        run_dir = os.path.join(root, "bench-step-runs", cfg.run.name)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            results[mode] = r = _steady([json.loads(line) for line in f])
        r["tflops"] = r["views_per_s"] * fpv / 1e12
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{base.objective.name} step on {device}: {_describe(base)}, {base.scans_per_worker} scans/worker, "
          f"{base.scaling.num_workers} worker(s), {fpv / 1e9:.1f} GFLOP/view (fwd+bwd)")
    for mode, r in results.items():
        print(f"  {mode:9s} {r['views_per_s']:9.1f} views/s  {r['tflops']:8.3f} TFLOP/s  data-stall {100 * r['data_wait_fraction']:5.1f}%")
    figures = {"bench": "step", "objective": base.objective.name, "device": device, "gflop_per_view": round(fpv / 1e9, 3),
               **{f"{m}_{k}": round(v, 4) for m, r in results.items() for k, v in r.items()}}
    if len(results) == 2:
        ratio = results["streaming"]["views_per_s"] / results["synthetic"]["views_per_s"]
        figures["streaming_over_synthetic"] = round(ratio, 4)
        print(f"streaming / synthetic: {ratio:.3f} (target >= 0.97)")
    print(TARGETS[base.objective.name])
    print(json.dumps(figures))
    ray.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return figures


def _describe(cfg) -> str:
    o = cfg.objective
    if o.name == "ctfm_simclr":
        return f"SegResEncoder init_filters={o.init_filters} blocks={list(o.blocks_down)}, {o.patches_per_scan} patches of {list(o.patch_size)} x 2 views"
    if o.name.startswith("totalfm"):
        m = o.model
        return f"VideoMAE {m.hidden_size}x{m.layers} on {len(o.organs.anatomies)} organs of {list(o.organs.size)}" + (
            f", mask {o.mask_ratio}" if o.name == "totalfm_mae" else f", text {o.text.hidden_size}x{o.text.layers}")
    return f"ViT {o.width}x{o.depth} at {list(o.input_size)} patch {list(o.patch)}, {len(o.anatomies)} anatomies, text {o.text.hidden_size}x{o.text.layers}"
