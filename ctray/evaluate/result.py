"""What an evaluation hands back, knowing nothing of the trainer: the in-training evaluation of a
task (ctray.objectives.spec.Evaluates) returns one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Evaluation:
    """What a task's evaluation hands the trainer: it prints `summary`, logs `metrics` and stores
    `files`, knowing none of their names."""

    metrics: dict[str, float]
    """Scalars for metrics.jsonl, TensorBoard and Tune."""
    summary: str
    """One line for the console."""
    files: dict[str, bytes] = field(default_factory=dict)
    """File name -> bytes, stored in <run>/eval/step_N/."""
