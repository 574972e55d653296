"""Typed config of `ctray pretrain` (see jobs/ctfm.yaml and jobs/ctfm-local.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ctray.config import RayConfig, Section, StorageConfig
from ctray.objectives import ObjectiveConfig


class DataConfig(Section):
    """Shards -> Ray Data -> each worker."""

    shards: str
    """Ingest output (folder or s3:// URI holding manifest.json); only committed shards are read."""
    scans_per_batch: int = 16
    """Scans per optimizer micro-step across all workers (CT-FM: 16); split evenly over workers."""
    prefetch_batches: int = 2
    """Batches each worker's iterator prepares ahead (iter_torch_batches)."""
    sampler_concurrency: int | None = None
    """CPU sampler tasks running at once (None: Ray Data decides from free CPUs)."""
    min_scans_per_pass: int = 1
    """Repeat the scan index until one pass of the iterator holds at least this many scans (each
    copy in its own shuffled order). Ray Data restarts its executor at each pass (seconds), which
    shows on small data sets; but a long pass keeps sampler tasks running ahead, which on a 2-core
    machine measured slower (a 10-step test run: 82 s at 512 against 52 s at 1). 1: no repetition."""
    shuffle_buffer_scans: int = 0
    """Local shuffle buffer (scans) in each worker on top of shuffled shard order; 0 disables."""
    synthetic: bool = False
    """Train on one in-memory batch of the objective's shape instead of the shards (to measure the
    step alone, `ctray bench step`); `shards` is then not read."""


class OptimConfig(Section):
    """torch AdamW (DeepSpeed's fused/CPU Adam would compile ops) with linear warmup + cosine."""

    lr: float = 1e-4
    """Peak learning rate (CT-FM 1e-4)."""
    weight_decay: float = 1e-6
    """AdamW weight decay (CT-FM 1e-6)."""
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 5000
    """Linear warmup steps (CT-FM: 10 of 500 epochs of 500 steps)."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    grad_clip: float = 0.0
    """Gradient norm clipping (0 disables; CT-FM does not clip)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (DeepSpeed gradient accumulation)."""


class TrainConfig(Section):
    """Loop length, logging and checkpoints."""

    max_steps: int = 250_000
    """Optimizer steps in the run (CT-FM: 500 epochs x 500 steps)."""
    log_every: int = 50
    """Steps between metric reports (loss, lr, views/s, data-wait fraction)."""
    checkpoint_every: int = 2000
    """Steps between checkpoints; the last step always checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage (older ones deleted by Ray Train)."""
    compile: bool = False
    """torch.compile the task (nn.Module.compile: parameter names unchanged) before DeepSpeed wraps it."""
    seed: int = 0
    """Seed of model init (same on every worker) and augmentation (offset by rank)."""
    fault_kill_at_step: int | None = None
    """Fault injection: rank 1 (or 0 alone) kills its own process once at this step, to test the
    cluster's recovery from checkpoints. Leave unset in real runs."""


class EvalConfig(Section):
    """Periodic evaluation, for objectives that have one (zero-shot and text-collapse diagnostics of
    TotalFM stage 2 and CA-GCL); results land in <run>/eval/step_N/ and in the metrics."""

    every: int = 0
    """Steps between evaluations; the last step always evaluates; 0: the last step only."""
    shards: str | None = None
    """Shards with known labels to evaluate on (None: data.shards)."""
    max_scans: int = 64
    """Scans evaluated (the first of the shards' index)."""
    enabled: bool = True
    """Off: no evaluation at all."""


class ScalingConfig(Section):
    """Ray Train workers."""

    num_workers: int = 2
    """Training workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """One GPU per worker; bf16 and NCCL."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; keep the rest for Ray Data's samplers."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers: PACK fills a node's GPUs first (NVLink within a node) and spans
    nodes when one is not enough; SPREAD puts them on different nodes."""


class DeepSpeedConfig(Section):
    """The DeepSpeed engine of each worker."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage (0, 1, 2 or 3)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""


class RunConfig(Section):
    """Where the run lives; a re-run with the same storage and name resumes it."""

    storage: str = "runs"
    """Folder or s3:// URI holding every run."""
    name: str = "pretrain"
    """Run name (no timestamps: the same name resumes)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails (-1: no limit). On spot
    or preemptible nodes, allow one per expected preemption (e.g. 10 for a multi-day run, or -1);
    each costs at most `train.checkpoint_every` steps plus the time to get the nodes back."""


class PretrainConfig(Section):
    """`ctray pretrain`: shards -> Ray Data -> Ray Train + DeepSpeed -> checkpoints + encoder export."""

    objective: ObjectiveConfig
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _batch_splits(self) -> "PretrainConfig":
        if self.data.scans_per_batch % self.scaling.num_workers:
            raise ValueError(
                f"data.scans_per_batch={self.data.scans_per_batch} must be a multiple of scaling.num_workers={self.scaling.num_workers}"
            )
        return self

    @property
    def scans_per_worker(self) -> int:
        return self.data.scans_per_batch // self.scaling.num_workers
