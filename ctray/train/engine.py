"""The DeepSpeed engine around a task: its config, the optimizer and schedule it steps, and what
must hold before `deepspeed.initialize` (no op compiled at start, no stale build lock).

DeepSpeed compiles C++/CUDA ops with torch's JIT extension loader into
`$TORCH_EXTENSIONS_DIR/<python>_<device>/<op>/` (default `~/.cache/torch_extensions`), guarded
by a `lock` file; a process killed mid-build leaves that file behind and every later build of the
op on the machine waits on it forever (torch's FileBaton has no timeout). ctray asks for nothing
compiled: torch's AdamW (on CUDA with `fused=True`, torch's own fused kernel, shipped in the torch
wheel), not DeepSpeed's FusedAdam/CPUAdam, which DeepSpeed builds at start, and not the CPU
backend's shared-memory collective op (below). The stale-lock check covers whatever DeepSpeed may
still build on another version or accelerator.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ctray.errors import ConfigError
from ctray.train.config import PretrainConfig
from ctray.train.optim import param_groups, warmup_cosine

STALE_LOCK_S = 600.0
"""A build lock older than this is left by a killed build: DeepSpeed's ops build in well under a
minute on CPU and a few minutes with CUDA."""


def mixed_precision(cfg: PretrainConfig, use_gpu: bool) -> bool:
    """Whether the forward runs under torch.autocast(bfloat16) (deepspeed.precision)."""
    return cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and use_gpu)


def deepspeed_config(cfg: PretrainConfig, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's config for the run. bf16 is torch's AMP (`torch_autocast`), not DeepSpeed's `bf16`
    mode: that one casts the parameters to bf16 and leaves buffers fp32, so BatchNorm fails ("expected
    scalar type BFloat16 but found Float") and SyncBatchNorm with it, and under ZeRO 0 it wraps AdamW
    in an optimizer whose fp32 master the temperature clamp cannot reach. Under autocast the
    parameters are the fp32 master: ZeRO 0-3 step them as in fp32 training, gradients accumulate and
    travel in fp32 (`grad_comm_dtype`), BatchNorm keeps fp32 weights and statistics, and only the
    matmuls and convolutions run in bf16. `lower_precision_safe_modules: []` keeps DeepSpeed from
    sending the gradients of Linear/Conv layers in bf16, its default under autocast.

    ZeRO 1-2 reduce the gradients in buckets while the backward still runs (`overlap_comm`; ZeRO 1
    does so on the micro-step that ends an accumulation), each bucket on a side stream once it
    holds `reduce_bucket_size` elements: DeepSpeed's default of 5e8 elements holds every ctray
    model whole, so the reduction would start only after the backward. ZeRO 3 overlaps by default."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage in (1, 2):
        zero |= {
            "overlap_comm": ds.overlap_comm,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
        }
    return {
        "train_micro_batch_size_per_gpu": cfg.scans_per_worker,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "torch_autocast": {
            "enabled": mixed_precision(cfg, use_gpu),
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        },
        "communication_data_type": cfg.deepspeed.grad_comm_dtype,
        # torch's AdamW: ZeRO calls every optimizer but its own "untested"; it compiles nothing.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # ctray logs its own metrics
        "wall_clock_breakdown": False,
    }


def extensions_root() -> Path:
    """Where torch's JIT extension loader builds ops: $TORCH_EXTENSIONS_DIR/<op>/, or by default
    ~/.cache/torch_extensions/<python>_<device>/<op>/ (torch.utils.cpp_extension)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def check_build_locks(root: Path | None = None, stale_s: float = STALE_LOCK_S, now: float | None = None) -> None:
    """Fail in one line when a DeepSpeed op's build folder holds a lock older than `stale_s`: the
    build that made it was killed, and DeepSpeed would wait on it forever."""
    from deepspeed.ops.op_builder.all_ops import ALL_OPS  # op name -> builder; the name is its build folder

    root = extensions_root() if root is None else root
    now = time.time() if now is None else now
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # a live build just finished
            continue
        if lock.parent.name in ALL_OPS and age > stale_s:
            raise ConfigError(
                f"stale build lock {lock} ({age / 60:.0f} min old): a build of DeepSpeed's op "
                f"'{lock.parent.name}' was killed, and every later build waits on this file forever; delete {lock} "
                "and run again"
            )


def skip_shm_collectives() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory collective op at initialize
    (deepspeed/comm/torch.py, build_shm_op). The op only serves `inference_all_reduce`: training's
    all-reduce and all-gather go through torch.distributed (gloo) either way, and the build costs
    ~40 CPU-seconds of gcc on every fresh machine and container. DeepSpeed probes its ops once into
    `deepspeed.ops.__compatible_ops__`, a dict it keeps for such edits."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cuda_settings() -> None:
    """The CUDA backends' settings for training (call once per worker process, on GPU workers):
    cuDNN benchmarks the convolution algorithms for each new input shape and keeps the fastest (the
    shapes repeat every step: CT-FM's patches, CA-GCL's crops; TotalFM's number of organ volumes
    varies by batch, and each new count is benchmarked once), and fp32 matmuls run on TF32 tensor
    cores. Under bf16 autocast the model's
    matmuls are bf16 already: TF32 is for what stays fp32, the losses' similarity matrices and
    projections (ctray computes logits in fp32), and for whole runs in deepspeed.precision=fp32."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def adamw(task: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """torch's AdamW over the task's parameter groups; fused (one kernel for the whole update,
    torch's own: nothing compiled) when every parameter is on CUDA, torch's default (foreach)
    elsewhere."""
    groups = [g for g in param_groups(task, cfg.optim.weight_decay) if g["params"]]
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=cfg.optim.betas, fused=fused or None)


def build_engine(cfg: PretrainConfig, task: torch.nn.Module, use_gpu: bool) -> tuple[Any, Any]:
    """The DeepSpeed engine around `task` with torch AdamW and the warmup-cosine schedule (the
    caller has checked the build locks: `check_build_locks`). On GPU the task moves to this
    process's device first (DeepSpeed would move it anyway), so that the optimizer sees CUDA
    parameters and fuses its update."""
    import deepspeed

    skip_shm_collectives()
    if use_gpu:
        task.to(torch.device("cuda", torch.cuda.current_device()))
    opt = adamw(task, cfg)
    factor = warmup_cosine(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    engine, _, _, sched = deepspeed.initialize(
        model=task, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, use_gpu), dist_init_required=False
    )
    return engine, sched


def gathered(module: torch.nn.Module, zero_stage: int) -> contextlib.AbstractContextManager[Any]:
    """Full parameters inside the block (collective under ZeRO-3: every rank must enter)."""
    import deepspeed

    if zero_stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def param_checksum(module: torch.nn.Module, zero_stage: int) -> float:
    """Sum of |parameters| (gathered under ZeRO-3): a cheap fingerprint that a checkpoint loads back exactly."""
    with gathered(module, zero_stage):
        return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


TAG = "ctray"
"""DeepSpeed's tag inside each Ray Train checkpoint folder: one checkpoint per folder."""


def saved_ranks(folder: str | Path) -> int:
    """How many data-parallel ranks wrote the ZeRO checkpoint in `folder` (0: no ZeRO partitions,
    as ZeRO 0 writes: any world size loads it)."""
    return len(list((Path(folder) / TAG).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def load_checkpoint(engine: Any, folder: str | Path, zero_stage: int) -> None:
    """Load the checkpoint in `folder` into `engine`, whatever the number of ranks that wrote it.

    ZeRO 1-3 partition the optimizer state by rank, and DeepSpeed loads such a checkpoint only on
    as many ranks. A checkpoint of another world size (a spot cluster back with fewer GPUs) goes
    through DeepSpeed's universal checkpoint: `ds_to_universal` writes each parameter's fp32 weight
    and Adam moments whole, and every rank loads its new partition of them. Each rank converts its
    own copy (Ray Train hands every rank the checkpoint locally; the models are small)."""
    import torch.distributed

    saved = saved_ranks(folder)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if zero_stage == 0 or saved in (0, world):
        engine.load_checkpoint(str(folder), tag=TAG)
        return
    import argparse
    import contextlib
    import io
    import tempfile

    from deepspeed.checkpoint import ds_to_universal

    with tempfile.TemporaryDirectory(prefix="ctray-universal-") as out:
        args = argparse.Namespace(
            input_folder=str(Path(folder) / TAG),
            output_folder=str(Path(out) / TAG),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # ds_to_universal wants Megatron's layout notes in the client state; ctray's models have
            # no tensor or pipeline parallel slices to describe.
            inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter it converts
            ds_to_universal.main(args)
        (Path(out) / "latest_universal").write_text(TAG)
        # ZeRO 3's universal load (DeepSpeed 0.19, stage3.py) copies the first param group's
        # hyperparameters onto every group (the no-weight-decay group would decay), and gives every
        # group one shared `step` tensor, which AdamW then counts up once per group and step (wrong
        # bias correction). Each group's own hyperparameters are put back (lr comes from the loaded
        # schedule, the same for every group) and each state gets its own step.
        groups = [
            {k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
            for g in engine.optimizer.param_groups
        ]
        # DeepSpeed reads this setting only when it loads (engine.load_checkpoint and the ZeRO
        # optimizer's load_state_dict), so it is set here, for this one load.
        engine._config.load_universal_checkpoint = True
        try:
            engine.load_checkpoint(out, tag=TAG)
        finally:
            engine._config.load_universal_checkpoint = False
        for group, own in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update(own)
        for state in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def report_checkpoint(engine: Any, metrics: dict[str, Any]) -> None:
    """Every rank saves its DeepSpeed shards to a temp folder and reports it with `metrics` to Ray
    Train, which merges the folders in the run's storage (shard names are rank-unique)."""
    import ray.train

    step = metrics["step"]
    with tempfile.TemporaryDirectory(prefix="ctray-ckpt-") as local:
        engine.save_checkpoint(local, tag=TAG, client_state={"step": step})
        checkpoint = ray.train.Checkpoint.from_directory(local)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")
