"""`ctray pretrain`: assemble the Ray Data pipeline and the Ray Train TorchTrainer, run, report."""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass

from ctray.data.pipeline import training_dataset
from ctray.objectives import get_objective
from ctray.runtime import ensure_ray, ensure_schedulable
from ctray.config import to_yaml
from ctray.errors import ConfigError
from ctray.storage import arrow_filesystem, filesystem, is_remote, publish_bytes, resolve_uri
from ctray.train.config import PretrainConfig
from ctray.train.loop import train_loop

log = logging.getLogger(__name__)


def worker_bundle(scaling) -> dict[str, float]:
    """The resources one training worker asks Ray for."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {})}


@dataclass
class PretrainResult:
    step: int
    loss: float
    checkpoint: str
    export: str
    logs: str


def run_pretrain(cfg: PretrainConfig, callbacks: list | None = None) -> PretrainResult:
    """Run (or resume) the pretraining described by `cfg`. `callbacks` are Ray Train callbacks
    (a sweep passes Tune's TuneReportCallback)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    cfg = cfg.model_copy(deep=True)
    cfg.data.shards = resolve_uri(cfg.data.shards)
    cfg.run.storage = resolve_uri(cfg.run.storage)
    if cfg.eval.shards:
        cfg.eval.shards = resolve_uri(cfg.eval.shards)
    ensure_ray(cfg.ray)
    ensure_schedulable(worker_bundle(cfg.scaling), "training worker", cfg.ray.schedule_timeout_s)

    fs, root = filesystem(cfg.run.storage, cfg.storage)
    publish_bytes(to_yaml(cfg).encode(), fs, posixpath.join(root, cfg.run.name, "config.yaml"), cfg.storage)

    spec = get_objective(cfg.objective.name)
    try:  # a config that does not fit its shards or its stage-1 run: one line for the CLI, as ingest does
        assets = spec.prepare(cfg)
        sampler = spec.sampler(cfg.objective, assets)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    datasets = {}
    if not cfg.data.synthetic:
        datasets["train"] = training_dataset(cfg.data.shards, cfg.storage, sampler, cfg.data.sampler_concurrency, cfg.data.min_scans_per_pass)
    afs, storage_path = arrow_filesystem(cfg.run.storage, cfg.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "assets": assets},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=worker_bundle(cfg.scaling),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=afs if is_remote(cfg.run.storage) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
    )
    log.info(
        "pretrain %s: objective %s, %d workers (%s), ZeRO %d, %d steps -> %s",
        cfg.run.name, cfg.objective.name, cfg.scaling.num_workers, "GPU" if cfg.scaling.use_gpu else "CPU",
        cfg.deepspeed.zero_stage, cfg.train.max_steps, posixpath.join(cfg.run.storage, cfg.run.name),
    )
    result = trainer.fit()
    run_dir = posixpath.join(cfg.run.storage, cfg.run.name)
    ckpt = result.checkpoint.path if result.checkpoint else ""
    if is_remote(cfg.run.storage) and ckpt and "://" not in ckpt:
        ckpt = cfg.run.storage.split("://")[0] + "://" + ckpt
    out = PretrainResult(
        step=int(result.metrics.get("step", 0)),
        loss=float(result.metrics.get("loss", float("nan"))),
        checkpoint=ckpt,
        export=posixpath.join(run_dir, "export", "encoder.safetensors"),
        logs=posixpath.join(run_dir, "tensorboard"),
    )
    evaluated = cfg.eval.enabled and hasattr(spec.task, "evaluate")
    log.info(
        "pretrain done in %.0fs at step %d (loss %.4f): checkpoint %s; tensorboard %s; metrics %s; export %s%s",
        time.time() - started, out.step, out.loss, out.checkpoint, out.logs, posixpath.join(run_dir, "metrics.jsonl"), out.export,
        f"; evaluation {posixpath.join(run_dir, 'eval')}" if evaluated else "",
    )
    return out
