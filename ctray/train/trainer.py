"""`ctray pretrain`: assemble the Ray Data pipeline and the Ray Train TorchTrainer, run, report."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ctray.config import to_yaml
from ctray.console import verbose
from ctray.data.pipeline import StreamPlan, place_data_actors_here, training_datasets
from ctray.errors import ConfigError, CtrayError, TrainingFailed, first_line
from ctray.export import TrainedOn
from ctray.ingest.shardset import ShardSet
from ctray.objectives import get_objective
from ctray.objectives.contrast import ContrastConfig
from ctray.redact import redact_text
from ctray.run_folder import RunFolder
from ctray.runtime import ensure_ray, ensure_schedulable
from ctray.storage import arrow_filesystem, is_remote, resolve_uri
from ctray.train import tracking
from ctray.train.config import PretrainConfig
from ctray.train.loop import train_loop

if TYPE_CHECKING:
    from ctray.objectives.spec import Sampler

log = logging.getLogger(__name__)


def preflight(cfg: PretrainConfig) -> None:
    """The config's checks that need no shards and no Ray: a run (and a sweep, once for all its
    trials) refuses in one line before anything starts."""
    require_held_out(cfg)
    require_whole_contrastive_batch(cfg)


def require_held_out(cfg: PretrainConfig) -> None:
    """A ConfigError (one line, before Ray starts) when the in-training evaluation would score the
    training scans without the config saying so (eval.on_training_scans); a warning when it says so.
    Figures measured on training scans land in metrics.jsonl, MLflow and W&B beside held-out ones,
    so this is a choice the config makes, not a default."""
    # The objectives that evaluate during training (zero-shot: TotalFM stage 2, CA-GCL) share ContrastConfig.
    evaluates = cfg.eval.enabled and isinstance(cfg.objective, ContrastConfig) and not cfg.data.synthetic
    if not evaluates or cfg.eval.shards not in (None, cfg.data.shards):
        return
    if not cfg.eval.on_training_scans:
        raise ConfigError(
            "eval.shards is not set, so the in-training evaluation would score the training scans: set it to a "
            "held-out shard set (README: Use what was pretrained), or eval.on_training_scans=true for a smoke test"
        )
    log.warning("eval: the in-training evaluation reads the training shards (eval.on_training_scans): not held-out")


def require_whole_contrastive_batch(cfg: PretrainConfig) -> None:
    """A ConfigError (one line, before Ray starts) when a CLIP-type recipe would accumulate gradients
    without the config accepting what it costs: the contrastive loss sees one micro-batch's
    negatives, not the step's (gradient caching, which would keep them, is not built)."""
    if cfg.optim.grad_accum > 1 and isinstance(cfg.objective, ContrastConfig) and not cfg.optim.accumulate_contrastive:
        micro = cfg.data.scans_per_batch  # across all workers: the loss gathers every rank's embeddings
        raise ConfigError(
            f"optim.grad_accum={cfg.optim.grad_accum} does not enlarge {cfg.objective.name}'s contrastive batch: each "
            f"micro-step contrasts its {micro} scans, not {micro * cfg.optim.grad_accum}; raise data.scans_per_batch "
            "(with more workers if one cannot hold it), or set optim.accumulate_contrastive=true to accept it"
        )


def _trained_on(cfg: PretrainConfig, shard_set: ShardSet) -> TrainedOn:
    """The training shard set as the export records it."""
    preprocess = shard_set.ingest.preprocess.model_dump(mode="json")
    return TrainedOn(redact_text(cfg.data.shards), shard_set.fingerprint, len(shard_set.scans()), preprocess)


def anatomies_per_scan(cfg: PretrainConfig, shard_set: ShardSet | None) -> float:
    """The mean number of the recipe's counted anatomies present per training scan, from the
    figures of `shard_set` (each shard's scans with a stored box of each anatomy); synthetic
    phantoms (no shard set) have every one. Logged: it scales the peak lr."""
    counted = cfg.objective.counted_anatomies()
    if shard_set is None:
        per_scan = float(len(counted))
    else:
        shards = shard_set.shards
        rows = sum(s.stats.rows for s in shards)
        if not rows:
            raise ConfigError(f"{cfg.data.shards}: no scans to count anatomies in (optim.lr_views_per_scan)")
        per_scan = sum(s.stats.anatomies.get(a, 0) for s in shards for a in counted) / rows
    log.info(
        "optim.lr_views_per_scan=anatomies: %.2f of the %d anatomies (%s) per scan in %s",
        per_scan,
        len(counted),
        ", ".join(counted),
        "the synthetic phantoms" if shard_set is None else cfg.data.shards,
    )
    return per_scan


def steps_for_epochs(cfg: PretrainConfig, scans: int) -> int:
    """train.epochs passes over `scans` scans, in optimizer steps (logged: the run's length)."""
    assert cfg.train.epochs is not None
    steps = max(1, math.ceil(cfg.train.epochs * scans / cfg.scans_per_step))
    log.info(
        "train.epochs=%g over %d scans at %d scans per step: %d steps",
        cfg.train.epochs,
        scans,
        cfg.scans_per_step,
        steps,
    )
    return steps


def _latest_checkpoint(run: RunFolder) -> dict[str, Any]:
    """Ray Train's record of the run's latest checkpoint ({} for a new run)."""
    if not run.exists("checkpoint_manager_snapshot.json"):
        return {}
    return json.loads(run.read("checkpoint_manager_snapshot.json")).get("latest_checkpoint_result") or {}


def resumed_step(run: RunFolder) -> int:
    """The step of the checkpoint Ray Train will resume this run from (0 for a new run): the data
    order continues from there."""
    return int(_latest_checkpoint(run).get("metrics", {}).get("step", 0))


def finished(run: RunFolder, steps: int) -> PretrainResult | None:
    """The result of a run that already reached `steps` and wrote its export (re-running it then
    trains nothing), else None."""
    latest = _latest_checkpoint(run)
    metrics = latest.get("metrics", {})
    if int(metrics.get("step", 0)) < steps or not run.exists("export/export.json"):
        return None
    return PretrainResult(
        step=int(metrics["step"]),
        loss=float(metrics.get("loss", float("nan"))),
        checkpoint=run.uri_of(latest.get("checkpoint_dir_name", "")),
        export=run.uri_of("export"),
        logs=run.uri_of("tensorboard"),
    )


@dataclass
class PretrainResult:
    step: int
    loss: float
    checkpoint: str
    export: str
    logs: str


def run_pretrain(cfg: PretrainConfig, callbacks: list[Any] | None = None) -> PretrainResult:
    """Run (or resume) the pretraining described by `cfg`. `callbacks` are Ray Train callbacks
    (a sweep passes Tune's TuneReportCallback)."""
    started = time.time()
    cfg = cfg.model_copy(deep=True)
    cfg.data.shards = resolve_uri(cfg.data.shards)
    cfg.run.storage = resolve_uri(cfg.run.storage)
    if cfg.eval.shards:
        cfg.eval.shards = resolve_uri(cfg.eval.shards)
    preflight(cfg)
    ensure_ray(cfg.ray)
    ensure_schedulable(cfg.scaling.worker_bundle(), "training worker", cfg.ray.schedule_timeout_s)

    run = cfg.run_folder()
    shard_set = None if cfg.data.synthetic else ShardSet.open(cfg.data.shards, cfg.storage)
    trained_on = None if shard_set is None else _trained_on(cfg, shard_set)
    scans = 0 if trained_on is None else trained_on.scans
    if cfg.train.epochs is not None:
        cfg.train.max_steps, cfg.train.epochs = steps_for_epochs(cfg, scans), None
    if cfg.optim.lr_views_per_scan == "anatomies":
        cfg.optim.lr_views_per_scan = anatomies_per_scan(cfg, shard_set)
    done = finished(run, cfg.train.steps)
    if done is not None:
        log.info("pretrain %s already reached step %d; export %s", run.uri, done.step, done.export)
        return done
    run.write("config.yaml", to_yaml(cfg).encode())

    objective = get_objective(cfg.objective.name)
    # A config that does not fit its shards raises ConfigError here, before any worker starts.
    assets = objective.prepare(cfg.objective, cfg.data.shards, run)
    sampler = objective.sampler(cfg.objective, assets)
    log.info(
        "pretrain %s: objective %s, %d workers (%s), ZeRO %d, %d steps, peak lr %.3g -> %s",
        cfg.run.name,
        cfg.objective.name,
        cfg.scaling.num_workers,
        "GPU" if cfg.scaling.use_gpu else "CPU",
        cfg.deepspeed.zero_stage,
        cfg.train.steps,
        cfg.peak_lr,
        run.uri,
    )
    ids = tracking.start(cfg, run)  # after prepare: a config that fails there opens no MLflow run
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "assets": assets.model_dump(mode="json"),
        "scans": scans,
        "trained_on": None if trained_on is None else asdict(trained_on),
        "tracking": ids,
        "verbose": verbose(),
    }
    try:
        result = _fit_with_restarts(cfg, run, sampler, loop_config, callbacks)
    except BaseException as e:  # a KeyboardInterrupt or a sweep stopping the trial: KILLED, not FAILED
        tracking.end(ids, "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    tracking.end(ids, "FINISHED")
    out = PretrainResult(
        step=int(result.metrics.get("step", 0)),
        loss=float(result.metrics.get("loss", float("nan"))),
        checkpoint=run.checkpoint_uri(result.checkpoint.path if result.checkpoint else ""),
        export=run.uri_of("export"),
        logs=run.uri_of("tensorboard"),
    )
    log.info(
        "pretrain done in %.0fs at step %d (loss %.4f): checkpoint %s; tensorboard %s; metrics %s; export %s%s",
        time.time() - started,
        out.step,
        out.loss,
        out.checkpoint,
        out.logs,
        run.uri_of("metrics.jsonl"),
        out.export,
        f"; evaluation {run.uri_of('eval')}" if run.exists("eval") else "",
    )
    return out


def _fit_with_restarts(
    cfg: PretrainConfig, run: RunFolder, sampler: Sampler, loop_config: dict[str, Any], callbacks: list[Any] | None
) -> Any:
    """trainer.fit(), and after a worker failure a new fit from the last checkpoint, up to
    run.max_failures times (preemptions announced by the cloud are not counted). Not restarted: a
    failure that is one of ctray's one-line errors (the user must fix something), and a failure
    that repeats: the same exception again before a new checkpoint (the data order and every seed
    are those of the failed attempt, so a restart would replay it). A lost worker process or node
    (spot capacity) always restarts, whatever happened before.

    ctray restarts instead of Ray Train so that each attempt's dataset starts at the checkpoint's
    place in the run's scan order: Ray Train's own restart would replay the stream from where this
    call began."""
    import ray.train

    if not cfg.data.synthetic:
        place_data_actors_here()
    failures = 0
    previous: tuple[str, int] | None = None  # the last failure and the checkpoint it left
    while True:
        trainer = _trainer(cfg, run, sampler, resumed_step(run), loop_config, callbacks)
        try:
            return trainer.fit()
        except (ray.train.WorkerGroupError, ray.train.PreemptionError) as e:
            actionable = _user_error(e)
            if actionable is not None:  # a config or machine the user must fix: a restart meets it again
                raise actionable from None
            preempted = isinstance(e, ray.train.PreemptionError)
            what, where = _failure_line(e), resumed_step(run)
            if not preempted and not _lost_worker(e) and previous == (what, where):
                raise TrainingFailed(
                    f"pretrain {cfg.run.name}: {what}, again after restarting from step {where}; not restarting a "
                    "failure that repeats"
                ) from None
            previous = (what, where)
            failures += not preempted
            if not preempted and cfg.run.max_failures != -1 and failures > cfg.run.max_failures:
                raise
            limit = "no limit" if cfg.run.max_failures == -1 else str(cfg.run.max_failures)
            log.warning(
                "pretrain %s: %s; restarting from the last checkpoint (failures %d, run.max_failures %s)",
                cfg.run.name, "a node was preempted" if preempted else f"a worker failed ({what})", failures, limit,
            )  # fmt: skip


def _failures(e: Exception) -> list[BaseException]:
    """The workers' exceptions in rank order (Ray hands each back as a subclass of its own type,
    RayTaskError(ConfigError), with the original as `cause`)."""
    failures = getattr(e, "worker_failures", {}) or {}
    return [getattr(f, "cause", None) or f for _, f in sorted(failures.items())] or [e]


def _lost_worker(e: Exception) -> bool:
    """A worker's process or node went away (killed, preempted, out of memory), rather than its code
    raising: the next attempt runs elsewhere or later, so it may well succeed."""
    import ray.exceptions

    lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
    return any(isinstance(f, lost) for f in _failures(e))


def _failure_line(e: Exception) -> str:
    """`Type: first line of its message` of the lowest rank's failure."""
    first = _failures(e)[0]
    return f"{type(first).__name__}: {first_line(first)}"


def _user_error(e: Exception) -> CtrayError | None:
    """The first of the workers' failures that is one of ctray's one-line errors (a stale build
    lock, a config the shards do not fit), else None."""
    for cause in _failures(e):
        if isinstance(cause, CtrayError):  # one line by design: its own first line, whole
            return type(cause)(str(cause).splitlines()[0] if str(cause) else "")
    return None


def _trainer(
    cfg: PretrainConfig,
    run: RunFolder,
    sampler: Sampler,
    start: int,
    loop_config: dict[str, Any],
    callbacks: list[Any] | None,
) -> Any:
    """One Ray Train attempt: the workers, and the dataset of the draws from checkpoint `start` on."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    streams = {}
    if not cfg.data.synthetic:
        # The micro-steps of the steps left, and one optimizer step's worth of slack.
        micro_steps = (max(0, cfg.train.steps - start) + 1) * cfg.optim.grad_accum
        plan = StreamPlan(
            seed=cfg.train.seed,
            steps=micro_steps,
            ranks=cfg.scaling.num_workers,
            per_rank=cfg.scans_per_worker,
            start=start * cfg.scans_per_step,
            concurrency=cfg.data.sampler_concurrency,
            verbose=verbose(),
            node_cache=cfg.data.node_cache,
            node_cache_bytes=int(cfg.data.node_cache_gb * 1e9),
        )
        streams = training_datasets(cfg.data.shards, cfg.storage, sampler, plan)
    afs, storage_path = arrow_filesystem(cfg.run.storage, cfg.storage)
    return TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "streams": streams},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_bundle(),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=afs if is_remote(cfg.run.storage) else None,
            # ctray restarts failed attempts itself (_fit_with_restarts).
            failure_config=ray.train.FailureConfig(max_failures=0, max_preemption_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks or None,
            # Ray Train's INFO lines to its log files only (<ray session>/logs/train), unless -v.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
    )
