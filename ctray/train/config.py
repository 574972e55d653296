"""Typed config of `ctray pretrain` (see jobs/ctfm.yaml and jobs/ctfm-local.yaml)."""

from __future__ import annotations

import posixpath
from typing import Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from ctray.config import RayConfig, Section, StorageConfig
from ctray.objectives import objective_config
from ctray.objectives.config import RecipeConfig
from ctray.run_folder import RunFolder


class DataConfig(Section):
    """Shards -> Ray Data -> each worker."""

    shards: str
    """Ingest output (folder or s3:// URI holding manifest.json); only committed shards are read."""
    scans_per_batch: int = 16
    """Scans per optimizer micro-step across all workers (CT-FM: 16); split evenly over workers."""
    prefetch_batches: int = 2
    """Batches each worker's iterator prepares ahead on the host (iter_torch_batches); one more is
    copied to the GPU while the step before it runs (ctray.train.loop.DevicePrefetcher)."""
    pin_memory: bool = True
    """GPU workers: Ray Data pins each batch in page-locked host memory (in its collate threads),
    so its copy to the GPU runs on a side stream while the previous step computes. False: pageable
    batches, whose copy the host stages and waits for (to measure what pinning buys: `ctray bench
    step ... data.pin_memory=false`). No effect on CPU workers."""
    sampler_concurrency: int | None = None
    """CPU sampler tasks running at once (None: Ray Data decides from free CPUs)."""
    shuffle_buffer_scans: int = 0
    """Local shuffle buffer (scans) in each worker on top of the seeded scan order (seeded from
    train.seed too); 0 disables. Two runs with one seed are equal, but a resumed run refills the
    buffer, so its batches after the resume differ from an uninterrupted run's (it warns); with 0,
    resumed and uninterrupted runs log the same losses (tests/integration/test_reproducible.py)."""
    node_cache: str | None = None
    """A folder on each node's local disk (an NVMe mount, say) where the node keeps a copy of each
    shard it reads, fetched from the shard set's storage once and checked against the manifest's
    sha256 (ctray.data.node_cache): later passes and runs on the node read the copy. Each node's
    copies go in a subfolder named by its Ray label `ctray.io/cache-node`, else its host name.
    None (default): every draw reads its scan from storage."""
    node_cache_gb: float = Field(100.0, gt=0)
    """Most GB of shard copies one node keeps; beyond, the least recently read go."""
    synthetic: bool = False
    """Train on one in-memory batch of the objective's shape instead of the shards (to measure the
    step alone, `ctray bench step`); `shards` is then not read."""

    @field_validator("node_cache")
    @classmethod
    def _local_folder(cls, v: str | None) -> str | None:
        # Each node resolves it on its own disk: a relative path would land in Ray's session folder.
        if v is not None and ("://" in v or not (v.startswith("/") or v.startswith("~"))):
            raise ValueError(f"node_cache must be an absolute local folder (or start with ~), not {v!r}")
        return v


class OptimConfig(Section):
    """torch AdamW with linear warmup + cosine. On GPU it is torch's fused AdamW (`fused=True`: a
    kernel shipped in torch, nothing compiled), not DeepSpeed's FusedAdam or CPUAdam, which
    DeepSpeed compiles when a run starts (ctray.train.engine)."""

    lr: float = 1e-4
    """Peak learning rate (CT-FM 1e-4)."""
    weight_decay: float = 1e-6
    """AdamW weight decay (CT-FM 1e-6)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's decay rates of the gradient's running mean and of its square."""
    warmup_steps: int = 5000
    """Linear warmup steps (CT-FM: 10 of 500 epochs of 500 steps)."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    grad_clip: float = 0.0
    """Gradient norm clipping (0 disables; CT-FM does not clip)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (DeepSpeed gradient accumulation). It does not enlarge a
    contrastive loss's batch: each micro-step contrasts its own scans only (the CLIP-type recipes
    refuse it unless `accumulate_contrastive`)."""
    accumulate_contrastive: bool = False
    """Let TotalFM stage 2 and CA-GCL accumulate gradients although each micro-batch then holds
    1/grad_accum of the negatives a batch of data.scans_per_batch x grad_accum would (CA-GCL's 56
    scans on 4 GPUs accumulating 4: 14 negatives per anatomy). Off: such a run refuses to start."""
    lr_base_batch: int | None = None
    """Linear scaling rule (MAE, VideoMAE: lr = 1.5e-4 x batch / 256): when set, `lr` is the base
    lr and the peak lr used is lr x views per step / lr_base_batch, with views per step =
    data.scans_per_batch x grad_accum x lr_views_per_scan. Logged as the effective lr. None: lr as given."""
    lr_views_per_scan: float | Literal["anatomies"] = 1.0
    """What the base batch counts, per scan: 1 for scans. A VideoMAE batch counts videos, and
    TotalFM stage 1 cuts one per organ the scan has: "anatomies" counts the mean number of the
    recipe's anatomies present per scan in the training shards (the manifest's figures), measured
    when the run starts and logged; a fixed 13 would count organs a chest or abdomen scan lacks."""


class TrainConfig(Section):
    """Loop length, logging and checkpoints."""

    max_steps: int | None = None
    """Optimizer steps in the run (CT-FM: 500 epochs x 500 steps); None: 250,000, or `epochs`."""
    epochs: float | None = None
    """Passes over the shards' scans instead of max_steps (give one of the two): steps =
    ceil(epochs x scans in the manifest / (data.scans_per_batch x optim.grad_accum)), computed and
    logged at start, and written to the run's config.yaml as max_steps (CA-GCL: 20 epochs at 56)."""
    log_every: int = 50
    """Steps between metric reports (loss, lr, views/s, data-wait fraction)."""
    checkpoint_every: int = 2000
    """Steps between checkpoints; the last step always checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage (older ones deleted by Ray Train)."""
    compile: bool = False
    """torch.compile the task (nn.Module.compile: parameter names unchanged) before DeepSpeed wraps it."""
    seed: int = 0
    """The one seed of the run: model init (the same on every worker), the scan order of every
    pass, each draw's sampling (patches, organ cuts, texts), each step's device randomness
    (augmentations, masking, dropout: offset by rank) and CA-GCL's permutations (the same on every
    worker). A resumed run continues all of them where its checkpoint left off."""
    sync_batchnorm: bool | None = None
    """Turn the task's BatchNorm layers into SyncBatchNorm (CT-FM trains so across GPUs). None: on
    when training on more than one GPU (SyncBatchNorm needs GPUs)."""

    @property
    def steps(self) -> int:
        """The run's length in optimizer steps (epochs are turned into max_steps by `ctray pretrain`)."""
        if self.epochs is not None:
            raise ValueError("train.epochs is not resolved to steps yet (ctray.train.trainer.steps_for_epochs)")
        return 250_000 if self.max_steps is None else self.max_steps


class DebugConfig(Section):
    """Faults injected on purpose, to test how a run recovers (or refuses to). Leave unset in real runs."""

    kill_at_step: int | None = None
    """Rank 1 (or 0 alone) kills its own process once at this step: a lost worker, which the run
    restarts from its last checkpoint."""
    raise_at_step: int | None = None
    """Rank 1 (or 0 alone) raises a RuntimeError at this step in every attempt: a failure that
    repeats, which stops the run after one restart."""


class EvalConfig(Section):
    """Periodic evaluation, for objectives that have one (zero-shot and text-collapse diagnostics of
    TotalFM stage 2 and CA-GCL); results land in <run>/eval/step_N/ and in the metrics."""

    every: int = 0
    """Steps between evaluations; the last step always evaluates; 0: the last step only."""
    shards: str | None = None
    """Held-out shards with known labels to evaluate on (e.g. CT-RATE's valid split ingested on its
    own). Required by the objectives that evaluate during training (TotalFM stage 2, CA-GCL)
    unless `on_training_scans`."""
    on_training_scans: bool = False
    """Let the in-training evaluation read data.shards when eval.shards is not set: its figures then
    come from scans the model trains on, fit for a smoke test or the quickstart's phantoms, never for
    a paper's table (the run warns). Off: such a run refuses to start without eval.shards."""
    max_scans: int = 64
    """Scans evaluated (the first of the shards' index)."""
    enabled: bool = True
    """Off: no evaluation at all."""


class ScalingConfig(Section):
    """Ray Train workers."""

    num_workers: int = 2
    """Training workers (one per GPU on GPU clusters)."""
    use_gpu: bool = False
    """One GPU per worker; NCCL (and bf16 with deepspeed.precision auto)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; keep the rest for Ray Data's samplers."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers: PACK fills a node's GPUs first (NVLink within a node) and spans
    nodes when one is not enough; SPREAD puts them on different nodes."""

    def worker_bundle(self) -> dict[str, float]:
        """The resources one training worker asks Ray for."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}


class DeepSpeedConfig(Section):
    """The DeepSpeed engine of each worker."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage (0, 1, 2 or 3)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16: mixed precision as torch's AMP (DeepSpeed's `torch_autocast`): the forward runs under
    torch.autocast(bfloat16) while parameters, gradients, their accumulation, the optimizer and
    BatchNorm statistics stay fp32, and ctray's losses and logits run in fp32; fp32: no autocast.
    auto: bf16 on GPU, fp32 on CPU. (CT-FM trained fp16 AMP with fp32 master weights; fVLM trains
    in fp32.)"""
    grad_comm_dtype: Literal["fp32", "bf16"] = "fp32"
    """dtype of the gradient all-reduce / reduce-scatter (DeepSpeed's communication_data_type):
    fp32 by default; bf16 halves the traffic between nodes at the cost of rounding each gradient
    before it is averaged."""
    overlap_comm: bool = True
    """ZeRO 1-2: reduce each gradient bucket while the backward goes on (ZeRO 3 always does)."""
    reduce_bucket_size: int = Field(25_000_000, gt=0)
    """ZeRO 1-2: gradient elements per reduction bucket. 2.5e7 (100 MB in fp32, 4x PyTorch DDP's
    25 MiB) cuts CT-FM's 78M parameters into ~3 buckets, VideoMAE-B's 93M into ~4 and CA-GCL's
    towers into ~8, so the reduction starts early in the backward; DeepSpeed's default 5e8 holds
    each whole, which leaves nothing to overlap."""
    allgather_bucket_size: int = Field(25_000_000, gt=0)
    """ZeRO 1-2: parameter elements per all-gather of the updated partitions after each optimizer
    step (DeepSpeed's default 5e8 gathers a ctray model in one go, through a buffer of its size)."""


Logger = Literal["tensorboard", "mlflow", "wandb"]


class MlflowConfig(Section):
    """MLflow tracking (run.loggers has mlflow): the driver opens the run and logs the config, rank 0
    logs the metrics, evaluation files and the export (ctray.train.tracking)."""

    tracking_uri: str | None = None
    """Tracking server (http://host:5000, databricks, sqlite:///path/mlflow.db). None:
    $MLFLOW_TRACKING_URI of the driver; neither set is an error, since MLflow's own default
    (./mlflow.db of the logging process) would land on whichever node rank 0 ran on. Credentials go
    in MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, never here."""
    experiment: str = "ctray"
    """Experiment holding the run (created when missing); the MLflow run is named run.name."""
    parent_run_id: str | None = None
    """MLflow run this one nests under (`ctray sweep` sets its sweep's run); None: top level."""


class WandbConfig(Section):
    """Weights & Biases tracking (run.loggers has wandb), all from rank 0; the entity is $WANDB_ENTITY
    or the API key's default."""

    project: str = "ctray"
    """W&B project; the W&B run is named run.name."""
    mode: Literal["online", "offline"] | None = None
    """None: $WANDB_MODE, else online when WANDB_API_KEY is set and offline when not (upload an
    offline run later with `wandb sync <dir>`)."""
    dir: str | None = None
    """Folder W&B writes its wandb/ folder into, on rank 0's node. None: the run folder when
    run.storage is local; on object storage a temporary folder whose offline run is copied to
    <run>/wandb/ at the end."""


class RunConfig(Section):
    """Where the run lives and where it is tracked; a re-run with the same storage and name resumes it."""

    storage: str = "runs"
    """Folder or s3:// URI holding every run."""
    name: str = "pretrain"
    """Run name (no timestamps: the same name resumes)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails (-1: no limit). On spot
    or preemptible nodes, allow one per expected preemption (e.g. 10 for a multi-day run, or -1);
    each costs at most `train.checkpoint_every` steps plus the time to get the nodes back."""
    loggers: list[Logger] = Field(default_factory=lambda: list[Logger](["tensorboard"]))
    """Where metrics go besides <run>/metrics.jsonl (always written): tensorboard (<run>/tensorboard),
    mlflow and wandb (`pip install 'ctray[tracking]'`), which also get the config, evaluation files
    and the export as artifacts. A resumed run continues the same MLflow and W&B runs."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    group: str | None = None
    """A name shared by related runs (`ctray sweep` sets its name): the W&B group and the MLflow tag
    ctray.group."""


class PretrainConfig(Section):
    """`ctray pretrain`: shards -> Ray Data -> Ray Train + DeepSpeed -> checkpoints + encoder export."""

    objective: SerializeAsAny[RecipeConfig]
    """The recipe and its settings; `name` selects a registered objective (ctray.objectives)."""
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @field_validator("objective", mode="before")
    @classmethod
    def _registered(cls, value: object) -> RecipeConfig:
        return objective_config(value)

    @model_validator(mode="after")
    def _one_length(self) -> PretrainConfig:
        if self.train.epochs is not None and self.train.max_steps is not None:
            raise ValueError("train: give max_steps or epochs, not both (override the other with null)")
        if self.train.epochs is not None and self.data.synthetic:
            raise ValueError("train.epochs counts passes over the shards: with data.synthetic give train.max_steps")
        return self

    @model_validator(mode="after")
    def _batch_splits(self) -> PretrainConfig:
        if self.data.scans_per_batch % self.scaling.num_workers:
            raise ValueError(
                f"data.scans_per_batch={self.data.scans_per_batch} must be a multiple of "
                f"scaling.num_workers={self.scaling.num_workers}"
            )
        return self

    @model_validator(mode="after")
    def _counted_anatomies(self) -> PretrainConfig:
        if self.optim.lr_views_per_scan == "anatomies" and not self.objective.counted_anatomies():
            raise ValueError(f"optim.lr_views_per_scan=anatomies: {self.objective.name} counts no anatomies per scan")
        return self

    @property
    def scans_per_step(self) -> int:
        """Scans per optimizer step across all workers (with gradient accumulation)."""
        return self.data.scans_per_batch * self.optim.grad_accum

    @property
    def peak_lr(self) -> float:
        """The lr the schedule peaks at: optim.lr, or scaled by the linear rule (optim.lr_base_batch)."""
        if self.optim.lr_base_batch is None:
            return self.optim.lr
        # "anatomies" is measured on the shards by the driver (run_pretrain) before anything reads this.
        assert not isinstance(self.optim.lr_views_per_scan, str), "lr_views_per_scan not measured yet"
        return self.optim.lr * self.scans_per_step * self.optim.lr_views_per_scan / self.optim.lr_base_batch

    def run_folder(self) -> RunFolder:
        """<run.storage>/<run.name>, where the run's files live."""
        return RunFolder(posixpath.join(self.run.storage, self.run.name), self.storage)

    @property
    def scans_per_worker(self) -> int:
        return self.data.scans_per_batch // self.scaling.num_workers
