"""The Ray Train worker loop: a DeepSpeed engine around the objective's task, fed by Ray Data.

`train` reads top to bottom, as torchtitan's trainer does: restore, then each optimizer step, with
logging, evaluation and checkpointing on their own cadences (ctray.train.metrics.Cadence), then the
export. `Worker` holds one rank's pieces and closes what it opened on every exit: the engine
(ctray.train.engine), the batches, the in-training evaluation (ctray.train.evaluation) and, on
rank 0, the run's loggers (ctray.train.loggers). The loop knows no metric or recipe names: a task
returns its scalars, an evaluating task its own summary line.

On (re)start each rank loads the latest checkpoint Ray Train hands it and continues from its step;
every draw and augmentation is seeded from (train.seed, step), so a resumed run continues as an
uninterrupted one would.

The batch path to a GPU: Ray Data collates each batch on the host and pins it there (its collate
threads, data.pin_memory), and `DevicePrefetcher` copies the next batch on a side stream while the
current step runs; the step itself asks the device for no value (Task), so the host queues its
kernels and the next copy well ahead of the GPU.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

from ctray import dist
from ctray.console import quiet_worker
from ctray.data.pipeline import stream_seed
from ctray.export import ExportRun, TrainedOn, write_export
from ctray.objectives import get_objective
from ctray.objectives.spec import Assets, Batch, Evaluates, Objective, Task
from ctray.train.config import PretrainConfig
from ctray.train.engine import (
    build_engine,
    check_build_locks,
    cuda_settings,
    gathered,
    load_checkpoint,
    mixed_precision,
    param_checksum,
    report_checkpoint,
)
from ctray.train.evaluation import InTrainingEvaluation
from ctray.train.loggers import MetricLoggers, open_loggers
from ctray.train.metrics import Cadence, MetricsWindow, flops_per_view, peak_flops
from ctray.train.optim import clamp_

log = logging.getLogger(__name__)


def train(worker: Worker) -> None:
    """One rank's run: every step left, reported on the cadence, then the export."""
    step = start = worker.restore()
    cadence = worker.cadence
    for step in worker.train_steps(start):
        worker.debug_faults(step)
        metrics = worker.window_metrics(step) if cadence.reports(step) else {}
        if cadence.evaluates(step):
            metrics |= worker.evaluate(step)
        if metrics:
            worker.loggers.log(step, metrics)
        if cadence.checkpoints(step):
            worker.checkpoint(metrics)
        elif metrics:
            worker.report(metrics)
    worker.export(step)


@dataclass(frozen=True)
class WorkerInputs:
    """What the driver (ctray.train.trainer) hands every rank besides the config."""

    assets: Assets = field(default_factory=Assets)
    """The objective's prepare() output."""
    scans: int = 0
    """Scans in the training shards (0: synthetic), for the epoch metric."""
    streams: dict[str, Any] = field(default_factory=dict)
    """Ray Data iterators, "train_<rank>" (ctray.data.pipeline.training_datasets)."""
    tracking: dict[str, Any] = field(default_factory=dict)
    """The MLflow / W&B runs the driver opened (ctray.train.tracking.start)."""
    trained_on: TrainedOn | None = None
    """The training shard set, for export.json (None: synthetic data)."""


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: config = {"cfg": PretrainConfig as JSON, "assets", "scans",
    "streams", "tracking", "trained_on", "verbose"}."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    if not config.get("verbose"):
        quiet_worker()  # torch's deprecations inside DeepSpeed, Ray Train's line per report (ctray.console)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    inputs = WorkerInputs(
        Assets.model_validate(config.get("assets", {})),
        config.get("scans", 0),
        config.get("streams", {}),
        config.get("tracking", {}),
        TrainedOn(**config["trained_on"]) if config.get("trained_on") else None,
    )
    with Worker(cfg, inputs) as worker:
        train(worker)


class Worker:
    """One rank's training: the task in its DeepSpeed engine, its batches, the cadence and window of
    its reports, its evaluation and (rank 0) the run's loggers. A context manager: the loggers close
    on every exit, marking the tracking runs failed when the attempt raised."""

    def __init__(self, cfg: PretrainConfig, inputs: WorkerInputs):
        import ray.train.torch

        check_build_locks()  # before the model: a stale lock fails the worker in seconds, not minutes
        self.cfg, self.inputs = cfg, inputs
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            cuda_settings()
        self.objective = get_objective(cfg.objective.name)
        self.run = cfg.run_folder()
        torch.manual_seed(cfg.train.seed)  # identical init on every rank
        self.task = self.objective.task(cfg.objective, inputs.assets)
        # Once per run, before the task is changed for training (SyncBatchNorm, compile): the model
        # FLOPs of a view, for each report's TFLOP/s and MFU (ctray.train.metrics). It costs one
        # step on a one-scan batch: 0.03-0.07 s for the local TotalFM and CA-GCL jobs on CPU, 2 s
        # for CT-FM's (measured on 2 busy cores), well under a second at paper size on a GPU.
        mixed = mixed_precision(cfg, cfg.scaling.use_gpu)
        one_scan = self.objective.synthetic_batch(cfg.objective, 1, torch.device("cpu"))
        fpv = flops_per_view(self.task, device_batch(self.task, one_scan, self.device), autocast=mixed)
        sync_bn = cfg.train.sync_batchnorm
        if sync_bn or (sync_bn is None and cfg.scaling.use_gpu and dist.world_size() > 1):
            self.task = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.task)
        if cfg.train.compile:
            self.task.compile()
        self.engine, self.sched = build_engine(cfg, self.task, cfg.scaling.use_gpu)
        self.evaluation = self._evaluation()
        self.cadence = Cadence(cfg.train, cfg.eval.every if self.evaluation is not None else -1)
        self.batches = _batches(cfg, self.objective, self.task, self.device, inputs.streams)
        self.window = MetricsWindow(fpv, peak_flops(self.device, bf16=mixed))
        if self.device.type == "cuda":  # the reported peak is training's, not the FLOP count's
            torch.cuda.reset_peak_memory_stats(self.device)
        self.last_evaluation: dict[str, float] | None = None
        self.advised: set[str] = set()
        self.loggers = MetricLoggers([])  # rank 0's are opened by restore(), at the step it resumes from

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.loggers.close(ok=error is None)

    def _evaluation(self) -> InTrainingEvaluation | None:
        if not (self.cfg.eval.enabled and isinstance(self.task, Evaluates)):
            return None
        evaluation = InTrainingEvaluation(self.cfg, self.inputs.assets, self.task, self.device)
        if not evaluation.chunks:
            log.warning("no evaluation: no scan of %s has finding labels", self.cfg.eval.shards or self.cfg.data.shards)
            return None
        return evaluation

    def restore(self) -> int:
        """Load the latest checkpoint Ray Train hands this attempt (if any), open the loggers, record
        where the ranks run and what was resumed. Returns the step to continue from."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                load_checkpoint(self.engine, d, self.cfg.deepspeed.zero_stage)
            log.info("rank %d resumed from %s at step %d", dist.rank(), checkpoint.path, self.engine.global_steps)
        step = int(self.engine.global_steps)
        if dist.rank() == 0:
            self.loggers = open_loggers(self.cfg, self.run, step, self.inputs.tracking)
        # Which Ray node each rank runs on: a run spanning nodes says so in its metrics.
        nodes = dist.gather_object(ray.get_runtime_context().get_node_id())
        if dist.rank() == 0:
            log.info("%d worker(s) on %d node(s)", dist.world_size(), len(set(nodes)))
        # With the FLOPs behind each report's TFLOP/s and MFU (`ctray bench step` reads them here).
        gflop = None if self.window.flops_per_view is None else self.window.flops_per_view / 1e9
        self.loggers.event(step, event="workers", nodes=nodes, gflop_per_view=gflop)
        if checkpoint is not None:
            checksum = param_checksum(self.engine.module, self.cfg.deepspeed.zero_stage)  # collective under ZeRO-3
            self.loggers.event(step, event="resume", checkpoint=checkpoint.path, param_checksum=checksum)
            if self.cfg.data.shuffle_buffer_scans and dist.rank() == 0:
                log.warning(
                    "data.shuffle_buffer_scans=%d: the resumed run refills its shuffle buffer, so from step %d its "
                    "batches differ from an uninterrupted run's (same scans per pass, another order within a buffer)",
                    self.cfg.data.shuffle_buffer_scans,
                    step,
                )
        return step

    def train_steps(self, step: int) -> Iterator[int]:
        """Runs this worker's batches from optimizer step `step` and yields each step reached, up to
        the last. The time between a yield and the next micro-step (reports, evaluation,
        checkpoints) is not training time (MetricsWindow)."""
        engine, seen, accumulated = self.engine, 0, 0
        t_end = time.perf_counter()
        for batch in self.batches():
            seen += 1
            wait = time.perf_counter() - t_end
            self.seed_step(step, step * self.cfg.optim.grad_accum + accumulated)
            out = engine(batch)
            engine.backward(out["loss"])
            boundary = engine.is_gradient_accumulation_boundary()  # asked before step() counts this micro-step
            engine.step()
            now = time.perf_counter()
            self.window.add(out, wait, now - t_end)
            t_end, accumulated = now, accumulated + 1
            if not boundary:
                continue
            accumulated = 0
            for param, low, high in self.task.clamped_parameters():
                clamp_(param, low, high, self.cfg.deepspeed.zero_stage)
            step = int(engine.global_steps)
            yield step
            if self.cadence.last(step):
                return
            t_end = time.perf_counter()
        if seen == 0:
            raise RuntimeError(
                f"worker {dist.rank()} got no full batch of {self.cfg.scans_per_worker} scans from the shards; "
                "ingest more scans or lower data.scans_per_batch"
            )
        raise RuntimeError(f"worker {dist.rank()}: its data stream ended at step {step} of {self.cfg.train.steps}")

    def seed_step(self, step: int, micro_step: int) -> None:
        """Each micro-step's randomness from (train.seed, step, micro-step): torch's generators
        (augmentations, masking, dropout) also from the rank, the task's shared draws (CA-GCL's
        permutations) the same on every rank. So a resumed run draws what an uninterrupted one would."""
        seed = self.cfg.train.seed
        torch.manual_seed(stream_seed(seed, "augment", micro_step, dist.rank()))
        self.task.begin_step(step, stream_seed(seed, "shared", micro_step))

    def window_metrics(self, step: int) -> dict[str, Any]:
        """The step, lr, epoch and the window's means (collective: every rank calls it)."""
        # Passes over the scans so far, from the step: it continues on resume.
        scans = self.inputs.scans
        epoch = step * self.cfg.scans_per_step / scans if scans else 0.0
        lr = self.sched.get_last_lr()[0]
        metrics = {"step": step, "time": time.time(), "epoch": epoch, "lr": lr, **self.window.report(self.device)}
        if dist.rank() == 0:
            for subject, line in self.task.advice(metrics).items():
                if subject not in self.advised:  # once per subject and attempt
                    self.advised.add(subject)
                    log.warning("step %d: %s", step, line)
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """The in-training evaluation's metrics; its files as artifacts (collective)."""
        assert self.evaluation is not None  # the cadence never evaluates without one
        metrics = self.last_evaluation = self.evaluation.run_at(step, self.engine.module)
        self.loggers.log_folder(self.run.eval_dir(step), step)
        return metrics

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """The run's files made durable, then every rank's shards reported with `metrics` and the
        parameters' checksum (collective)."""
        checksum = param_checksum(self.engine.module, self.cfg.deepspeed.zero_stage)
        self.loggers.sync()
        report_checkpoint(self.engine, {**metrics, "param_checksum": checksum})

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)

    def export(self, step: int) -> None:
        """The trained parts in <run>/export (ctray.export), gathered first under ZeRO-3; then, once
        every rank has finished its part (the barrier), export/ as artifacts."""
        with gathered(self.task, self.cfg.deepspeed.zero_stage):
            if dist.rank() == 0:
                write = lambda name, data: self.run.write(f"export/{name}", data)  # noqa: E731
                run = ExportRun(step, self.inputs.trained_on, self.last_evaluation)
                write_export(self.task, self.cfg.objective, self.inputs.assets, write, run)
        if dist.is_dist():
            torch.distributed.barrier()
        self.loggers.log_folder("export", step)

    def debug_faults(self, step: int) -> None:
        """debug.kill_at_step / raise_at_step, on rank 1 (or 0 alone)."""
        debug = self.cfg.debug
        if dist.rank() != (1 if dist.world_size() > 1 else 0):
            return
        if debug.raise_at_step == step:
            raise RuntimeError(f"injected failure at step {step} (debug.raise_at_step)")
        marker = f"_fault_injected_step{step}"
        if debug.kill_at_step != step or self.run.exists(marker):
            return
        self.run.write(marker, b"")
        log.warning("fault injection: rank %d kills its own process at step %d", dist.rank(), step)
        os.kill(os.getpid(), 9)


def device_batch(task: Task, host: Batch, device: torch.device) -> Batch:
    """A host batch with the task's host fields (Task.host_fields), on `device`."""
    return {k: v.to(device) for k, v in {**host, **task.host_fields(host)}.items()}


class DevicePrefetcher:
    """Host batches -> device batches, one ahead: each batch's host fields (Task.host_fields) are
    added and its copy to the GPU is queued on a side stream before the batch before it is handed
    to the step, so the copy runs while that step computes. Ray Data's own transfer
    (iter_torch_batches(device=...)) copies on the default stream, between one step's kernels and
    the next, which then waits for it. With pinned host tensors (`pin`; Ray Data pins its batches
    in its collate threads, data.pin_memory) the copy is asynchronous; pageable ones the host stages
    and waits for. The step's stream waits for its batch's copy, and each tensor is recorded on that
    stream so that the caching allocator does not hand its memory to the next copy while the step
    still reads it. On a CPU device: the same order, no streams, tensors as they are."""

    def __init__(self, batches: Iterable[Batch], task: Task, device: torch.device, pin: bool = False):
        self.batches, self.task, self.device = batches, task, device
        self.pin = pin and device.type == "cuda"

    def __iter__(self) -> Iterator[Batch]:
        source = iter(self.batches)
        copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        ahead = self._copy(next(source, None), copies)
        while ahead is not None:
            batch = ahead
            if copies is not None:
                step = torch.cuda.current_stream(self.device)
                step.wait_stream(copies)  # before the next copy is queued: the step waits for its own batch only
                for t in batch.values():
                    t.record_stream(step)
            ahead = self._copy(next(source, None), copies)
            yield batch

    def _copy(self, host: Batch | None, copies: torch.cuda.Stream | None) -> Batch | None:
        if host is None:
            return None
        host = {**host, **self.task.host_fields(host)}
        if copies is None:
            return {k: v.to(self.device) for k, v in host.items()}
        with torch.cuda.stream(copies):
            return {k: self._pinned(v).to(self.device, non_blocking=True) for k, v in host.items()}

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self.pin and not t.is_pinned() else t


def _batches(
    cfg: PretrainConfig, objective: Objective[Any], task: Task, device: torch.device, streams: dict[str, Any]
) -> Callable[[], Iterable[Batch]]:
    """This worker's device batches: its Ray Data stream (training_datasets) through a
    DevicePrefetcher, or one synthetic batch forever."""
    if cfg.data.synthetic:
        host = objective.synthetic_batch(cfg.objective, cfg.scans_per_worker, torch.device("cpu"))
        fixed = device_batch(task, host, device)
        return lambda: itertools.repeat(fixed)
    stream = streams[f"train_{dist.rank()}"]
    pin = cfg.data.pin_memory and device.type == "cuda"
    return lambda: DevicePrefetcher(
        stream.iter_torch_batches(
            batch_size=cfg.scans_per_worker,
            prefetch_batches=cfg.data.prefetch_batches,
            device="cpu",  # to the GPU by the DevicePrefetcher, on its side stream
            pin_memory=pin,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_scans or None,
            # Seeded, but from the start of this attempt's stream: a resumed run shuffles its buffer anew.
            local_shuffle_seed=stream_seed(cfg.train.seed, "shuffle", dist.rank()),
        ),
        task,
        device,
        pin,
    )
