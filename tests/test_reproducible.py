"""One seed, one run: every random draw (scan order, sampling, augmentation, DeepSpeed steps)
derives from train.seed, the pass and the step, so two runs with the same seed log the same
losses, and a run whose worker is SIGKILLed and resumed from its checkpoint logs the losses of the
uninterrupted run (same data in the same order, same augmentations)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ctray.train.trainer import run_pretrain

from test_pretrain import pretrain_cfg

pytestmark = pytest.mark.slow  # end-to-end runs of a minute or more: the slow tier

# Two micro-steps per optimizer step: the accumulation boundary, and the seeds of each micro-step.
STEPS = [
    "train.max_steps=10",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "optim.warmup_steps=2",
    "optim.grad_accum=2",
]


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"], m["epoch"]) for m in lines if "loss" in m]


def test_same_seed_same_losses_and_a_killed_run_resumes_the_same_trajectory(train_shards, tmp_path):
    runs = tmp_path / "runs"
    run_pretrain(pretrain_cfg(train_shards, runs, "straight", *STEPS))
    killed = run_pretrain(
        pretrain_cfg(train_shards, runs, "killed", *STEPS, "train.fault_kill_at_step=7", "run.max_failures=1")
    )
    assert killed.step == 10 and (runs / "killed" / "_fault_injected_step7").exists()
    straight, resumed = losses(runs / "straight"), losses(runs / "killed")
    # Re-running a finished run trains nothing and hands back its result.
    again = run_pretrain(pretrain_cfg(train_shards, runs, "straight", *STEPS))
    assert again.step == 10 and again.loss == straight[-1][1] and losses(runs / "straight") == straight
    assert [s for s, _, _ in straight] == list(range(1, 11)) == [s for s, _, _ in resumed]
    # Steps 6-10 of the killed run were redone from the step-5 checkpoint (the 2 steps after it were
    # lost: less than one checkpoint interval) by a new attempt whose data stream starts at that
    # checkpoint's place in the scan order, with the weights exactly as saved.
    log = [json.loads(line) for line in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    resumes = [m for m in log if m.get("event") == "resume"]
    saved = {m["step"]: m["param_checksum"] for m in log if "param_checksum" in m}
    assert [r["step"] for r in resumes] == [5] and resumes[0]["param_checksum"] == pytest.approx(saved[5], rel=1e-12)
    export = load_file(str(runs / "killed" / "export" / "encoder.safetensors"))  # MONAI SegResEncoder keys
    assert export and all(t.dtype.is_floating_point for t in export.values())
    assert [loss for _, loss, _ in resumed] == pytest.approx([loss for _, loss, _ in straight], rel=1e-6, abs=1e-7)
    assert [e for _, _, e in resumed] == [e for _, _, e in straight] and straight[-1][2] > 1  # epochs continue
    other = run_pretrain(pretrain_cfg(train_shards, runs, "other-seed", *STEPS, "train.max_steps=2", "train.seed=1"))
    assert other.step == 2
    assert [loss for _, loss, _ in losses(runs / "other-seed")] != pytest.approx(
        [loss for _, loss, _ in straight[:2]], rel=1e-3
    )
