"""What the loop measures and when it reports: the cadence of logs, evaluations and checkpoints,
the metrics window (sums since the last report), the model FLOPs behind its TFLOP/s and MFU, the
step rate and the console's step line."""

from __future__ import annotations

import collections
import copy
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ctray import dist
from ctray.train.config import TrainConfig

if TYPE_CHECKING:
    from ctray.objectives.spec import Batch, Task


@dataclass(frozen=True)
class Cadence:
    """When a step logs, evaluates and checkpoints: three independent decisions, each also at the
    last step."""

    train: TrainConfig
    eval_every: int
    """0: evaluate at the last step only; -1: never (no evaluation for this task or config)."""

    def last(self, step: int) -> bool:
        return step >= self.train.steps

    def logs(self, step: int) -> bool:
        return self.last(step) or step % self.train.log_every == 0

    def evaluates(self, step: int) -> bool:
        if self.eval_every < 0:
            return False
        return self.last(step) or (self.eval_every > 0 and step % self.eval_every == 0)

    def checkpoints(self, step: int) -> bool:
        return self.last(step) or step % self.train.checkpoint_every == 0

    def reports(self, step: int) -> bool:
        """A report to Ray Train at this step. Each carries the window's metrics, evaluation or
        checkpoint alike: Tune's schedulers read the loss from every report."""
        return self.logs(step) or self.evaluates(step) or self.checkpoints(step)


class MetricsWindow:
    """The task's scalars, views, data wait and training time summed over the micro-steps since the
    last report. Sums stay on the device: a float() per step would wait for the GPU every step.
    Training time is what the micro-steps took, so evaluations and checkpoints between reports do
    not lower the throughput. With the task's FLOPs per view (`flops_per_view`) a report has each
    worker's TFLOP/s, and with the device's peak (`peak_flops`) the model FLOPs utilisation."""

    def __init__(self, flops_per_view: float | None = None, peak_flops: float | None = None) -> None:
        self.flops_per_view = flops_per_view
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.train_s = 0.0
        self.wait_s = 0.0
        self.views = 0.0
        self.micro_steps = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor], wait_s: float, step_s: float) -> None:
        """One micro-step's outputs; `wait_s` of its `step_s` seconds waited for the batch."""
        self.wait_s += wait_s
        self.train_s += step_s
        self.views += float(out["views"])  # a CPU tensor: no device sync
        self.micro_steps += 1
        for k, v in out.items():
            if k != "views":
                self.sums[k] = self.sums.get(k, 0.0) + v.detach()

    def report(self, device: torch.device) -> dict[str, float | None]:
        """Means over the window, averaged across workers (views summed: a TotalFM rank counts its
        own organs), and a fresh window (collective: every rank calls it). `tflops_per_worker` and
        `mfu` are each worker's share of the model FLOPs over its training time; `peak_memory_gib`
        the most GPU memory the run's tensors held at once on any worker since training began
        (None on CPU)."""
        elapsed = max(self.train_s, 1e-9)
        world = dist.world_size()
        means = {k: dist.mean_across_workers(float(v) / self.micro_steps, device) for k, v in self.sums.items()}
        views_per_s = dist.mean_across_workers(self.views, device) * world / elapsed
        flops = None if self.flops_per_view is None else views_per_s * self.flops_per_view / world
        out = {
            "loss": means.pop("loss"),
            "views_per_s": views_per_s,
            "tflops_per_worker": None if flops is None else flops / 1e12,
            "mfu": None if flops is None or self.peak_flops is None else flops / self.peak_flops,
            "peak_memory_gib": peak_memory_gib(device),
            "data_wait_fraction": dist.mean_across_workers(self.wait_s / elapsed, device),
            **means,
        }
        self.reset()
        return out


def peak_memory_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated, the most over the workers, in GiB (collective); None on CPU."""
    if device.type != "cuda":
        return None
    return dist.max_across_workers(torch.cuda.max_memory_allocated(device) / 2**30, device)


def flops_per_view(task: Task, batch: Batch, autocast: bool = False) -> float:
    """Model FLOPs of one view: torch's FlopCounterMode (matmuls, convolutions, attention) over the
    task's forward + backward on `batch` (a one-scan synthetic batch: the count depends on shapes,
    not values or hardware), divided by the views it holds; `autocast` runs it under bf16 autocast
    as training does. Runs a copy of the task on the batch's device and restores torch's random
    generators: the task's parameters, gradients and BatchNorm statistics and the run's random
    streams stay as they were. A task that gathers across workers (CLIP losses) makes this a
    collective: every rank calls it."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(iter(batch.values())).device
    counted = copy.deepcopy(task).to(device)
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, torch.autocast(device.type, torch.bfloat16, enabled=autocast), FlopCounterMode(display=False) as counter:
        out = counted(batch)
        out["loss"].backward()
    return counter.get_total_flops() / float(out["views"])


PEAK_BF16_TFLOPS = (
    ("h200 nvl", 835.0),
    ("h200", 989.0),  # SXM, and GH200's GPU
    ("h100 nvl", 835.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("a100", 312.0),  # SXM4 and PCIe
)
"""Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's datasheets, by a
lower-case part of torch.cuda.get_device_name(); the first that matches counts."""


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The device's dense tensor-core peak in FLOP/s: bf16's, or TF32's (half of it on these
    parts) for fp32 runs, whose matmuls and convolutions run in TF32 (ctray.train.engine.cuda_settings).
    None on CPU and on GPUs not in PEAK_BF16_TFLOPS: no MFU is reported then."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for part, tflops in PEAK_BF16_TFLOPS:
        if part in name:
            return tflops * 1e12 * (1.0 if bf16 else 0.5)
    return None


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
    """The console's line per report, e.g. `step 40/200  loss 1.2345  lr 1.0e-04  312.4 views/s
    194 TFLOP/s/worker  MFU 19.6%  peak 42.1 GiB  data-wait 3.1%  eta 0:04:12` (TFLOP/s, MFU and peak
    memory where the report has them: MFU and memory on GPUs only)."""
    eta = "?" if eta_s is None else str(datetime.timedelta(seconds=round(eta_s)))
    parts = [
        f"step {step}/{total}",
        f"loss {metrics['loss']:.4f}",
        f"lr {metrics['lr']:.1e}",
        f"{metrics['views_per_s']:.1f} views/s",
    ]
    if (tflops := metrics.get("tflops_per_worker")) is not None:
        parts.append(f"{tflops:.3g} TFLOP/s/worker")
    if (mfu := metrics.get("mfu")) is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if (memory := metrics.get("peak_memory_gib")) is not None:
        parts.append(f"peak {memory:.1f} GiB")
    parts += [f"data-wait {100 * metrics['data_wait_fraction']:.1f}%", f"eta {eta}"]
    return "  ".join(parts)
