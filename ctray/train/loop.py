"""The Ray Train worker loop: a DeepSpeed engine around the objective's task, fed by Ray Data.

Every rank saves its DeepSpeed checkpoint shards to its own temp folder and reports it; Ray
Train merges the folders in the run's storage (shard names are rank-unique). On (re)start each
rank loads the latest reported checkpoint and continues from its step.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time

import torch

from ctray import dist
from ctray.objectives import get_objective
from ctray.storage import filesystem, publish_bytes
from ctray.train.config import PretrainConfig

log = logging.getLogger(__name__)
TAG = "ctray"


def deepspeed_config(cfg: PretrainConfig, use_gpu: bool) -> dict:
    bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and use_gpu)
    return {
        "train_micro_batch_size_per_gpu": cfg.scans_per_worker,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no op compilation on any machine
        "steps_per_print": 2**31 - 1,  # ctray logs its own metrics
        "wall_clock_breakdown": False,
    }


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _RunFiles:
    """Rank 0's TensorBoard events and metrics.jsonl, written locally and copied to the run's
    storage at every checkpoint and at the end."""

    def __init__(self, cfg: PretrainConfig, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.fs, root = filesystem(cfg.run.storage, cfg.storage)
        self.root = posixpath.join(root, cfg.run.name)
        self.storage = cfg.storage
        self.local = tempfile.mkdtemp(prefix="ctray-run-")
        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))
        # A resumed run keeps the history up to its checkpoint; later lines were lost with the crash.
        try:
            old = [json.loads(line) for line in self.fs.cat_file(posixpath.join(self.root, "metrics.jsonl")).decode().splitlines()]
        except FileNotFoundError:
            old = []
        self.metrics: list[dict] = [m for m in old if m["step"] <= start_step]

    def event(self, **fields) -> None:
        self.metrics.append(fields)

    def log(self, metrics: dict) -> None:
        step = metrics["step"]
        for k, v in metrics.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        self.metrics.append(metrics)

    def sync(self) -> None:
        self.tb.flush()
        publish_bytes("".join(json.dumps(m) + "\n" for m in self.metrics).encode(), self.fs, posixpath.join(self.root, "metrics.jsonl"), self.storage)
        tb_local = os.path.join(self.local, "tensorboard")
        for name in os.listdir(tb_local):
            with open(os.path.join(tb_local, name), "rb") as f:
                publish_bytes(f.read(), self.fs, posixpath.join(self.root, "tensorboard", name), self.storage)


def _maybe_inject_fault(cfg: PretrainConfig, step: int, rank: int, world: int) -> None:
    if cfg.train.fault_kill_at_step != step or rank != (1 if world > 1 else 0):
        return
    fs, root = filesystem(cfg.run.storage, cfg.storage)
    marker = posixpath.join(root, cfg.run.name, f"_fault_injected_step{step}")
    if fs.exists(marker):
        return
    publish_bytes(b"", fs, marker, cfg.storage)
    log.warning("fault injection: rank %d kills its own process at step %d", rank, step)
    os.kill(os.getpid(), 9)


def param_checksum(module: torch.nn.Module, zero_stage: int) -> float:
    """Sum of |parameters| (gathered under ZeRO-3): a cheap fingerprint that a checkpoint loads back exactly."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else contextlib.nullcontext():
        return float(sum(p.detach().double().abs().sum() for p in params))


def _export(engine, task, cfg: PretrainConfig, step: int) -> None:
    """The encoder as safetensors + JSON config in <run>/export (gathered first under ZeRO-3)."""
    import deepspeed
    from safetensors.torch import save

    module = task.export_module()
    gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if cfg.deepspeed.zero_stage == 3 else contextlib.nullcontext()
    with gather:
        if dist.rank() == 0:
            state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
            fs, root = filesystem(cfg.run.storage, cfg.storage)
            out = posixpath.join(root, cfg.run.name, "export")
            publish_bytes(save(state), fs, posixpath.join(out, "encoder.safetensors"), cfg.storage)
            meta = {"objective": cfg.objective.name, "step": step, **task.export_config()}
            publish_bytes(json.dumps(meta, indent=1).encode(), fs, posixpath.join(out, "encoder.json"), cfg.storage)


def train_loop(config: dict) -> None:
    cfg = PretrainConfig.model_validate(config["cfg"])
    use_gpu = cfg.scaling.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rank, world = dist.rank(), dist.world_size()
    device = ray.train.torch.get_device()
    spec = get_objective(cfg.objective.name)

    torch.manual_seed(cfg.train.seed)  # identical init on every rank
    assets = config.get("assets", {})
    task = spec.task(cfg.objective, assets)
    if cfg.train.compile:
        task.compile()
    opt = torch.optim.AdamW(task.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio))
    engine, opt, _, sched = deepspeed.initialize(
        model=task, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, use_gpu), dist_init_required=False
    )
    torch.manual_seed(cfg.train.seed * 7919 + rank + 1)  # different augmentations per rank

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
        log.info("rank %d resumed from %s at step %d", rank, checkpoint.path, engine.global_steps)
    step = engine.global_steps
    files = _RunFiles(cfg, step) if rank == 0 else None
    # Which Ray node each rank runs on: a run spanning nodes says so in its metrics.
    nodes = dist.gather_object(ray.get_runtime_context().get_node_id())
    if files is not None:
        files.event(event="workers", step=step, time=time.time(), nodes=nodes)
        log.info("%d worker(s) on %d node(s)", world, len(set(nodes)))
    if checkpoint is not None:
        checksum = param_checksum(engine.module, cfg.deepspeed.zero_stage)
        if files is not None:
            files.event(event="resume", step=step, checkpoint=checkpoint.path, param_checksum=checksum)

    shard = None if cfg.data.synthetic else ray.train.get_dataset_shard("train")
    fixed = spec.synthetic_batch(cfg.objective, cfg.scans_per_worker, device) if cfg.data.synthetic else None

    def batches_of_epoch():
        if fixed is not None:
            return itertools.repeat(fixed)
        return shard.iter_torch_batches(
            batch_size=cfg.scans_per_worker, prefetch_batches=cfg.data.prefetch_batches, drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_scans or None,
        )

    evaluation = _Evaluation(cfg, spec, assets, task, device) if cfg.eval.enabled and hasattr(task, "evaluate") else None

    win = {"t0": time.perf_counter(), "wait": 0.0, "views": 0.0, "n": 0, "metrics": {}}
    epoch = 0
    while step < cfg.train.max_steps:
        batches = 0
        t_end = time.perf_counter()
        for batch in batches_of_epoch():
            win["wait"] += time.perf_counter() - t_end
            batches += 1
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            # Sums stay on the device: a float() per step would wait for the GPU every step.
            win["views"] += float(out["views"]) * world  # a CPU tensor: no device sync
            win["n"] += 1
            for k, v in out.items():
                if k != "views":
                    win["metrics"][k] = win["metrics"].get(k, 0.0) + v.detach()
            if not engine.is_gradient_accumulation_boundary():
                t_end = time.perf_counter()
                continue
            step = engine.global_steps
            _maybe_inject_fault(cfg, step, rank, world)
            last = step >= cfg.train.max_steps
            evaluate_now = evaluation is not None and (last or (cfg.eval.every and step % cfg.eval.every == 0))
            if step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or evaluate_now or last:
                elapsed = time.perf_counter() - win["t0"]
                metrics = {
                    "step": step,
                    "time": time.time(),
                    "epoch": epoch,
                    "loss": dist.mean_across_workers(float(win["metrics"].pop("loss")) / win["n"], device),
                    "lr": sched.get_last_lr()[0],
                    "views_per_s": win["views"] / elapsed,
                    "data_wait_fraction": dist.mean_across_workers(win["wait"] / elapsed, device),
                    **{k: dist.mean_across_workers(float(v) / win["n"], device) for k, v in win["metrics"].items()},
                }
                if evaluate_now:
                    metrics.update(evaluation.run(step))
                if files is not None:
                    files.log(metrics)
                    log.info("step %d  loss %.4f  lr %.2e  %.1f views/s  data-wait %.1f%%", step, metrics["loss"], metrics["lr"], metrics["views_per_s"], 100 * metrics["data_wait_fraction"])
                if step % cfg.train.checkpoint_every == 0 or last:
                    metrics["param_checksum"] = param_checksum(engine.module, cfg.deepspeed.zero_stage)
                    _checkpoint(engine, metrics, files)
                else:
                    ray.train.report(metrics)
                win = {"t0": time.perf_counter(), "wait": 0.0, "views": 0.0, "n": 0, "metrics": {}}
            if last:
                break
            t_end = time.perf_counter()
        if batches == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch of {cfg.scans_per_worker} scans in an epoch; "
                "ingest more scans or lower data.scans_per_batch"
            )
        epoch += 1
    _export(engine, task, cfg, step)
    if files is not None:
        files.sync()


class _Evaluation:
    """The objective's evaluation on a fixed set of scans, sampled with a fixed seed and read chunk
    by chunk at each evaluation (holding them would cost GBs at CA-GCL's input size). Every rank
    runs it (ZeRO-3 gathers parameters collectively); rank 0 publishes the files."""

    def __init__(self, cfg: PretrainConfig, spec, assets: dict, task, device):
        from ctray.data.pipeline import ShardRowReader, scan_index

        self.cfg, self.task, self.device = cfg, task, device
        uri = cfg.eval.shards or cfg.data.shards
        items = scan_index(uri, cfg.storage)[: cfg.eval.max_scans]
        self.reader = ShardRowReader(uri, cfg.storage, spec.sampler(cfg.objective, assets, seed=0))
        n = cfg.scans_per_worker
        self.chunks = [items[i : i + n] for i in range(0, len(items), n)]

    def batches(self):
        for chunk in self.chunks:
            out = self.reader({"path": [i["path"] for i in chunk], "row_group": [i["row_group"] for i in chunk]})
            yield {k: torch.as_tensor(v).to(self.device) for k, v in out.items()}

    def run(self, step: int) -> dict[str, float]:
        self.task.eval()
        try:
            result = self.task.evaluate(self.batches(), step)
        finally:
            self.task.train()
        if dist.rank() == 0:
            fs, root = filesystem(self.cfg.run.storage, self.cfg.storage)
            folder = posixpath.join(root, self.cfg.run.name, "eval", f"step_{step:08d}")
            for name, data in result.files.items():
                publish_bytes(data, fs, posixpath.join(folder, name), self.cfg.storage)
            m = result.metrics
            log.info(
                "eval step %d: zero-shot finding AUROC %.3f ± %.3f, anatomy AUROC %.3f ± %.3f (over %d templates); "
                "text cos(different anatomies) %.3f ± %.3f; files %s",
                step, m["zs_finding_auroc_mean"], m["zs_finding_auroc_std"], m["zs_anatomy_auroc_mean"], m["zs_anatomy_auroc_std"],
                len(self.cfg.objective.zero_shot.templates), m["text_cos_mean"], m["text_cos_std"],
                posixpath.join(self.cfg.run.storage, self.cfg.run.name, "eval", f"step_{step:08d}"),
            )
        return result.metrics


def _checkpoint(engine, metrics: dict, files) -> None:
    import ray.train

    local = tempfile.mkdtemp(prefix="ctray-ckpt-")
    engine.save_checkpoint(local, tag=TAG, client_state={"step": metrics["step"]})
    if files is not None:
        files.sync()
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=f"checkpoint_{metrics['step']:08d}")
    shutil.rmtree(local, ignore_errors=True)
