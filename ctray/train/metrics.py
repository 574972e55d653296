"""What the loop measures and when it reports: the cadence of logs, evaluations and checkpoints,
the metrics window (sums since the last report), the step rate and the console's step line."""

from __future__ import annotations

import collections
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ctray import dist
from ctray.train.config import TrainConfig


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
    not lower the throughput."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.train_s = 0.0
        self.wait_s = 0.0
        self.views = 0.0
        self.micro_steps = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor], wait_s: float, step_s: float, world: int) -> None:
        """One micro-step's outputs; `wait_s` of its `step_s` seconds waited for the batch."""
        self.wait_s += wait_s
        self.train_s += step_s
        self.views += float(out["views"]) * world  # a CPU tensor: no device sync
        self.micro_steps += 1
        for k, v in out.items():
            if k != "views":
                self.sums[k] = self.sums.get(k, 0.0) + v.detach()

    def report(self, device: torch.device) -> dict[str, float]:
        """Means over the window, averaged across workers, and a fresh window (collective: every rank
        calls it)."""
        elapsed = max(self.train_s, 1e-9)
        means = {k: dist.mean_across_workers(float(v) / self.micro_steps, device) for k, v in self.sums.items()}
        out = {
            "loss": means.pop("loss"),
            "views_per_s": self.views / elapsed,
            "data_wait_fraction": dist.mean_across_workers(self.wait_s / elapsed, device),
            **means,
        }
        self.reset()
        return out


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
