"""The Ray Train worker loop: a DeepSpeed engine around the objective's task, fed by Ray Data.

Every rank saves its DeepSpeed checkpoint shards to its own temp folder and reports it; Ray
Train merges the folders in the run's storage (shard names are rank-unique). On (re)start each
rank loads the latest reported checkpoint and continues from its step.

The loop is split into the pieces torchtitan's trainer has: a metrics window (sums since the last
report), a cadence (when to log, evaluate, checkpoint), the run's files and tracker
(ctray.train.tracking) on rank 0, the console's step line and the run folder (ctray.run_folder).
The trainer knows no metric or recipe names: a task returns its scalars, an evaluating task
returns its own summary line.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctray import dist
from ctray.data.pipeline import stream_seed
from ctray.objectives import get_objective
from ctray.objectives.spec import Batch, Evaluates, Objective, Task
from ctray.run_folder import RunFolder
from ctray.train.config import PretrainConfig, TrainConfig
from ctray.train.engine import TAG, build_engine, check_build_locks, gathered, load_checkpoint, param_checksum
from ctray.train.optim import clamp_
from ctray.train.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cadence:
    """When a step logs, evaluates and checkpoints; the last step does all three."""

    train: TrainConfig
    eval_every: int
    """0: evaluate at the last step only; -1: never (no evaluation for this task or config)."""

    def last(self, step: int) -> bool:
        return step >= self.train.steps

    def should_eval(self, step: int) -> bool:
        if self.eval_every < 0:
            return False
        return self.last(step) or (self.eval_every > 0 and step % self.eval_every == 0)

    def should_checkpoint(self, step: int) -> bool:
        return self.last(step) or step % self.train.checkpoint_every == 0

    def should_log(self, step: int) -> bool:
        return step % self.train.log_every == 0 or self.should_checkpoint(step) or self.should_eval(step)


class MetricsWindow:
    """The task's scalars, views and data-wait summed over the micro-steps since the last report.
    Sums stay on the device: a float() per step would wait for the GPU every step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.wait_s = 0.0
        self.views = 0.0
        self.micro_steps = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor], wait_s: float, world: int) -> None:
        self.wait_s += wait_s
        self.views += float(out["views"]) * world  # a CPU tensor: no device sync
        self.micro_steps += 1
        for k, v in out.items():
            if k != "views":
                self.sums[k] = self.sums.get(k, 0.0) + v.detach()

    def report(self, device: torch.device) -> dict[str, float]:
        """Means over the window, averaged across workers (collective: every rank calls it)."""
        elapsed = time.perf_counter() - self.t0
        means = {k: dist.mean_across_workers(float(v) / self.micro_steps, device) for k, v in self.sums.items()}
        return {
            "loss": means.pop("loss"),
            "views_per_s": self.views / elapsed,
            "data_wait_fraction": dist.mean_across_workers(self.wait_s / elapsed, device),
            **means,
        }


class StepClock:
    """The recent optimizer-step rate (over the last few reports, checkpoints and evaluations included:
    they are part of what is left) and the time to the last step it gives."""

    def __init__(self, reports: int = 5, now: Callable[[], float] = time.perf_counter):
        self.points: collections.deque[tuple[int, float]] = collections.deque(maxlen=reports + 1)
        self.now = now

    def mark(self, step: int) -> None:
        self.points.append((step, self.now()))

    def eta_s(self, step: int, total: int) -> float | None:
        """Marks `step` now; seconds to `total` at the recent rate (None before a step was timed)."""
        self.mark(step)
        (s0, t0), (s1, t1) = self.points[0], self.points[-1]
        return max(0, total - step) * (t1 - t0) / (s1 - s0) if s1 > s0 else None


def step_line(step: int, total: int, metrics: dict[str, Any], eta_s: float | None) -> str:
    """The console's line per report, e.g.
    `step 40/200  loss 1.2345  lr 1.0e-04  312.4 views/s  data-wait 3.1%  eta 0:04:12`."""
    eta = "?" if eta_s is None else str(datetime.timedelta(seconds=round(eta_s)))
    return (
        f"step {step}/{total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.1e}  {metrics['views_per_s']:.1f} views/s"
        f"  data-wait {100 * metrics['data_wait_fraction']:.1f}%  eta {eta}"
    )


class RunFiles:
    """Rank 0's metrics.jsonl and (run.loggers has tensorboard) TensorBoard events, written locally
    and copied to the run's storage at every checkpoint and at the end."""

    def __init__(self, run: RunFolder, start_step: int, tensorboard: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.local = tempfile.mkdtemp(prefix="ctray-run-")
        self.tb = SummaryWriter(os.path.join(self.local, "tensorboard")) if tensorboard else None
        # A resumed run keeps the history up to its checkpoint; later lines were lost with the crash.
        old = (
            [json.loads(line) for line in self.run.read("metrics.jsonl").decode().splitlines()]
            if run.exists("metrics.jsonl")
            else []
        )
        self.metrics: list[dict[str, Any]] = [m for m in old if m["step"] <= start_step]

    def event(self, **fields: Any) -> None:
        self.metrics.append(fields)

    def log(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if self.tb is not None and k not in ("step", "time") and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, metrics["step"])
        self.metrics.append(metrics)

    def close(self) -> None:
        """The last sync; the writer and the local folder go."""
        self.sync()
        if self.tb is not None:
            self.tb.close()
        shutil.rmtree(self.local, ignore_errors=True)

    def sync(self) -> None:
        self.run.write("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics).encode())
        if self.tb is None:
            return
        self.tb.flush()
        tb_local = os.path.join(self.local, "tensorboard")
        for name in os.listdir(tb_local):
            with open(os.path.join(tb_local, name), "rb") as f:
                self.run.write(f"tensorboard/{name}", f.read())


class InTrainingEvaluation:
    """The task's evaluation on a fixed set of scans, sampled with a fixed seed and read chunk by
    chunk at each evaluation (holding them would cost GBs at CA-GCL's input size). Every rank runs
    it (ZeRO-3 gathers parameters collectively); rank 0 publishes the files."""

    def __init__(
        self,
        cfg: PretrainConfig,
        objective: Objective[Any],
        assets: dict[str, Any],
        task: Evaluates,
        device: torch.device,
    ):
        from ctray.data.pipeline import ScanOrder, ShardRowReader, labelled
        from ctray.data.shardset import ShardSet

        self.task, self.device = task, device
        self.run = RunFolder.of(cfg)
        uri = cfg.eval.shards or cfg.data.shards
        # The first scans with finding labels, in manifest order: unlabelled ones score nothing.
        order = ScanOrder(labelled(ShardSet.open(uri, cfg.storage)), seed=None)
        self.reader = ShardRowReader(uri, cfg.storage, objective.sampler(cfg.objective, assets), order, seed=0)
        count, n = min(cfg.eval.max_scans, len(order)), cfg.scans_per_worker
        self.chunks = [np.arange(i, min(i + n, count)) for i in range(0, count, n)]

    def batches(self) -> Iterator[Batch]:
        for draws in self.chunks:
            out = self.reader({"id": draws})
            yield {k: torch.as_tensor(v).to(self.device) for k, v in out.items()}

    def run_at(self, step: int, module: torch.nn.Module) -> dict[str, float]:
        module.eval()
        try:
            result = self.task.evaluate(self.batches(), step)
        finally:
            module.train()
        if dist.rank() == 0:
            for name, data in result.files.items():
                self.run.write(f"{self.run.eval_dir(step)}/{name}", data)
            log.info("%s; files %s", result.summary, self.run.uri_of(self.run.eval_dir(step)))
        return result.metrics


def _maybe_inject_fault(cfg: PretrainConfig, run: RunFolder, step: int) -> None:
    """debug.kill_at_step / raise_at_step, on rank 1 (or 0 alone)."""
    if dist.rank() != (1 if dist.world_size() > 1 else 0):
        return
    if cfg.debug.raise_at_step == step:
        raise RuntimeError(f"injected failure at step {step} (debug.raise_at_step)")
    marker = f"_fault_injected_step{step}"
    if cfg.debug.kill_at_step != step or run.exists(marker):
        return
    run.write(marker, b"")
    log.warning("fault injection: rank %d kills its own process at step %d", dist.rank(), step)
    os.kill(os.getpid(), 9)


def _export(task: Task, cfg: PretrainConfig, run: RunFolder, step: int, assets: dict[str, Any]) -> None:
    """The trained parts in <run>/export (ctray.export), gathered first under ZeRO-3."""
    from ctray.export import write_export

    with gathered(task, cfg.deepspeed.zero_stage):
        if dist.rank() == 0:
            write_export(task, cfg.objective, step, assets, lambda name, data: run.write(f"export/{name}", data))


def _checkpoint(engine: Any, metrics: dict[str, Any], files: RunFiles | None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="ctray-ckpt-") as local:
        engine.save_checkpoint(local, tag=TAG, client_state={"step": metrics["step"]})
        if files is not None:
            files.sync()
        checkpoint = ray.train.Checkpoint.from_directory(local)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{metrics['step']:08d}")


def _quiet_ray_reports() -> None:
    """Ray Train logs every report of every rank ("Reporting training result N: TrainingReport(...)")
    at INFO on a logger named after its file, outside `ray.train`, so the run's LoggingConfig misses
    it; ctray's own line says the same once. `ctray -v` keeps it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray: its lines show, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: config = {"cfg": PretrainConfig as JSON, "assets": ...}."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    if not config.get("verbose"):
        _quiet_ray_reports()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    worker = Worker(
        cfg, config.get("assets", {}), config.get("scans", 0), config.get("streams", {}), config.get("tracking", {})
    )
    done = False
    try:
        step = worker.restore()
        # One pass holds every step left (training_datasets); the synthetic batch repeats for ever.
        step = worker.run_pass()
        if not worker.cadence.last(step):
            raise RuntimeError(f"worker {dist.rank()}: its data stream ended at step {step} of {cfg.train.steps}")
        worker.finish(step)
        worker.track_export(step)
        done = True
    finally:
        if worker.tracker is not None:
            worker.tracker.close(done)


class Worker:
    """One rank's training: the task in its DeepSpeed engine, its batches, the cadence of reports,
    evaluations and checkpoints, and (rank 0) the run's files."""

    def __init__(
        self,
        cfg: PretrainConfig,
        assets: dict[str, Any],
        scans: int,
        streams: dict[str, Any],
        tracking: dict[str, Any] | None = None,
    ):
        import ray.train.torch

        check_build_locks()  # before the model: a stale lock fails the worker in seconds, not minutes
        self.cfg, self.assets = cfg, assets
        self.device = ray.train.torch.get_device()
        self.objective = get_objective(cfg.objective.name)
        self.run = RunFolder.of(cfg)
        torch.manual_seed(cfg.train.seed)  # identical init on every rank
        self.task = self.objective.task(cfg.objective, assets)
        sync_bn = cfg.train.sync_batchnorm
        if sync_bn or (sync_bn is None and cfg.scaling.use_gpu and dist.world_size() > 1):
            self.task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.task)
        if cfg.train.compile:
            self.task.compile()
        self.engine, self.sched = build_engine(cfg, self.task, cfg.scaling.use_gpu)
        self.scans = scans
        self.evaluation = None
        if cfg.eval.enabled and isinstance(self.task, Evaluates):
            self.evaluation = InTrainingEvaluation(cfg, self.objective, assets, self.task, self.device)
            if not self.evaluation.chunks:
                log.warning("no evaluation: no scan of %s has finding labels", cfg.eval.shards or cfg.data.shards)
                self.evaluation = None
        self.cadence = Cadence(cfg.train, cfg.eval.every if self.evaluation is not None else -1)
        self.batches = _batches(cfg, self.objective, self.device, streams)
        self.window = MetricsWindow()
        self.files: RunFiles | None = None
        self.tracking = tracking or {}  # the MLflow / W&B runs the driver opened (tracking.start)
        self.tracker: Tracker | None = None
        self.clock = StepClock()

    def restore(self) -> int:
        """Load the latest checkpoint Ray Train hands this attempt (if any); record where the ranks
        run and what was resumed. Returns the step to continue from."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                load_checkpoint(self.engine, d, self.cfg.deepspeed.zero_stage)
            log.info("rank %d resumed from %s at step %d", dist.rank(), checkpoint.path, self.engine.global_steps)
        step = int(self.engine.global_steps)
        if dist.rank() == 0:
            self.files = RunFiles(self.run, step, "tensorboard" in self.cfg.run.loggers)
            self.tracker = Tracker(self.cfg, self.run, self.tracking) if self.tracking else None
        self.clock.mark(step)
        # Which Ray node each rank runs on: a run spanning nodes says so in its metrics.
        nodes = dist.gather_object(ray.get_runtime_context().get_node_id())
        if self.files is not None:
            self.files.event(event="workers", step=step, time=time.time(), nodes=nodes)
            log.info("%d worker(s) on %d node(s)", dist.world_size(), len(set(nodes)))
        if checkpoint is not None:
            checksum = param_checksum(self.engine.module, self.cfg.deepspeed.zero_stage)  # collective under ZeRO-3
            if self.files is not None:
                self.files.event(event="resume", step=step, checkpoint=checkpoint.path, param_checksum=checksum)
        return step

    def run_pass(self) -> int:
        """This worker's batches up to the last step; returns the step reached."""
        engine, cadence = self.engine, self.cadence
        step, seen, accumulated = int(engine.global_steps), 0, 0
        t_end = time.perf_counter()
        for batch in self.batches():
            seen += 1
            wait = time.perf_counter() - t_end
            self.seed_step(step, step * self.cfg.optim.grad_accum + accumulated)
            out = engine({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()  # asked before step() counts this micro-step
            engine.step()
            self.window.add(out, wait, dist.world_size())
            t_end = time.perf_counter()
            accumulated += 1
            if not boundary:
                continue
            accumulated = 0
            for param, low, high in self.task.clamped_parameters():
                clamp_(param, low, high, self.cfg.deepspeed.zero_stage)
            step = int(engine.global_steps)
            _maybe_inject_fault(self.cfg, self.run, step)
            if cadence.should_log(step):
                self.report(step)
                t_end = time.perf_counter()
            if cadence.last(step):
                break
        if seen == 0:
            raise RuntimeError(
                f"worker {dist.rank()} got no full batch of {self.cfg.scans_per_worker} scans from the shards; "
                "ingest more scans or lower data.scans_per_batch"
            )
        return step

    def seed_step(self, step: int, micro_step: int) -> None:
        """Each micro-step's randomness from (train.seed, step, micro-step): torch's generators
        (augmentations, masking, dropout) also from the rank, the task's shared draws (CA-GCL's
        permutations) the same on every rank. So a resumed run draws what an uninterrupted one would."""
        seed = self.cfg.train.seed
        torch.manual_seed(stream_seed(seed, "augment", micro_step, dist.rank()))
        self.task.begin_step(step, stream_seed(seed, "shared", micro_step))

    def report(self, step: int) -> None:
        """Means of the window (+ evaluation) to metrics.jsonl, TensorBoard, the console and Ray
        Train; with a checkpoint when the cadence says so. Collective: every rank calls it."""
        import ray.train

        lr = self.sched.get_last_lr()[0]
        # Passes over the scans so far, from the step: it continues on resume.
        epoch = step * self.cfg.scans_per_step / self.scans if self.scans else 0.0
        metrics: dict[str, Any] = {"step": step, "time": time.time(), "epoch": epoch, "lr": lr}
        metrics.update(self.window.report(self.device))
        if self.evaluation is not None and self.cadence.should_eval(step):
            metrics.update(self.evaluation.run_at(step, self.engine.module))
            if self.tracker is not None:  # the files rank 0's run_at has just written
                self.tracker.log_folder(self.run.eval_dir(step), step)
        if self.files is not None:
            self.files.log(metrics)
            log.info("%s", step_line(step, self.cfg.train.steps, metrics, self.clock.eta_s(step, self.cfg.train.steps)))
        if self.tracker is not None:
            self.tracker.log_metrics(step, metrics)
        if self.cadence.should_checkpoint(step):
            metrics["param_checksum"] = param_checksum(self.engine.module, self.cfg.deepspeed.zero_stage)
            _checkpoint(self.engine, metrics, self.files)
        else:
            ray.train.report(metrics)
        self.window.reset()  # after evaluation and checkpoint: the next window times training alone

    def finish(self, step: int) -> None:
        _export(self.task, self.cfg, self.run, step, self.assets)
        if self.files is not None:
            self.files.close()

    def track_export(self, step: int) -> None:
        """export/ as artifacts, from rank 0 once every rank has finished its part of it (the barrier):
        rank 0 holds the W&B run, and the export is complete whichever ranks write it."""
        if dist.is_dist():
            torch.distributed.barrier()
        if self.tracker is not None:
            self.tracker.log_folder("export", step)


def _batches(
    cfg: PretrainConfig, objective: Objective[Any], device: torch.device, streams: dict[str, Any]
) -> Callable[[], Iterable[Batch]]:
    """This worker's batches: its Ray Data stream (training_datasets), or one synthetic batch forever."""
    if cfg.data.synthetic:
        fixed = objective.synthetic_batch(cfg.objective, cfg.scans_per_worker, device)
        return lambda: itertools.repeat(fixed)
    stream = streams[f"train_{dist.rank()}"]
    return lambda: stream.iter_torch_batches(
        batch_size=cfg.scans_per_worker,
        prefetch_batches=cfg.data.prefetch_batches,
        drop_last=True,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer_scans or None,
        # Seeded, but from the start of this attempt's stream: a resumed run shuffles its buffer anew.
        local_shuffle_seed=stream_seed(cfg.train.seed, "shuffle", dist.rank()),
    )
