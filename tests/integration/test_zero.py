"""DeepSpeed engines of every ZeRO stage, in fp32 and in bf16 (autocast), in one 2-process gloo group:
checkpoints load back exactly, on as many ranks and on another number of ranks, and a learnable
temperature stays inside its bounds.

The test starts this file as a script (helpers.run_ranks). For each stage and
precision, each rank builds the real ctfm_simclr task and engine (ctray.train.engine.build_engine),
takes 2 steps, saves a checkpoint, loads it into a fresh engine built from another seed, and takes
a third step on both. Then the real CA-GCL task's temperature is pushed past its upper bound in the
optimizer's fp32 copy, clamped (ctray.train.optim.clamp_) and stepped: module and optimizer must
agree and stay at the bound (DeepSpeed's own bf16 mode lost it under ZeRO 0: module 0.5, master
0.637). Before all that, one process does the same in bf16 alone, and the 2 ranks also resume its
checkpoints (1 -> 2): a cluster back with more GPUs resumes (a 2-worker run resumed on 1:
test_pretrain.py::test_loss_falls_training_from_s3_shards). Every rank steps on the same batch with
the same augmentation draws, so the mean gradient is one rank's, and the third step must be the
one-rank engine's. Each rank writes what it measured to a JSON file; the assertions are made here,
in the test process. (The Ray Train resume path, a worker killed mid-run:
test_reproducible.py::test_same_seed_same_losses_and_a_killed_run_resumes_the_same_trajectory.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")


@pytest.mark.timeout(240)
def test_zero_checkpoints_load_back_and_the_temperature_stays_bounded(tmp_path):
    from helpers import TINY, run_ranks

    overrides = [*TINY, "data.shards=unused", "train.max_steps=10"]
    (one,) = run_ranks(__file__, tmp_path / "one", {"overrides": overrides, "precisions": ["bf16"]}, world=1)
    args = {"overrides": overrides, "precisions": PRECISIONS, "resume": str(tmp_path / "one")}
    results = run_ranks(__file__, tmp_path, args)
    # ctray asks DeepSpeed for no compiled op (its CPU backend would build a shared-memory one).
    assert not list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob("*.so"))
    cases = [f"{stage}-{precision}" for stage in STAGES for precision in PRECISIONS]
    resumed = [f"{stage}-bf16-resumed" for stage in STAGES]
    assert [sorted(r) for r in results] == [sorted(cases + resumed)] * 2
    for case in cases:
        r, other = results[0][case], results[1][case]
        assert r["steps_saved"] == 2
        assert r["fresh"] != pytest.approx(r["saved"], rel=1e-6)  # the fresh engine started elsewhere
        assert r["loaded"] == pytest.approx(r["saved"], rel=1e-12), case
        assert r["steps_loaded"] == 2 and r["steps_after"] == 3
        assert r["after"] != pytest.approx(r["loaded"], rel=1e-9)  # and it trains on
        # with the optimizer's moments and the lr schedule: its third step is the original engine's
        assert r["after"] == pytest.approx(r["continued"], rel=1e-9), case
        assert r["lr_loaded"] == pytest.approx(r["lr_saved"]) and r["lr_saved"] != pytest.approx(r["lr_fresh"])
        # autocast keeps the parameters (the optimizer's master) and BatchNorm's statistics in fp32
        assert r["dtypes"] == ["torch.float32"], case
        # ZeRO 1-2 reduce in 2.5e7-element buckets during the backward (ctray.train.engine), as DeepSpeed
        # took it (ZeRO 3 overlaps by its own default)
        if case[0] in "12":
            assert r["comm"] == [True, 25_000_000, 25_000_000], case
        # ZeRO shards the state, not the model: both ranks see the same parameters
        for k in ("saved", "loaded", "after"):
            assert other[k] == pytest.approx(r[k], rel=1e-12), (case, k)
        # The temperature: clamped to 0.5 in the module and in the optimizer's copy; one AdamW step
        # (lr 2e-3 at most) later both still agree, within one step of the bound.
        high = 0.5
        assert r["tau_pushed"] > high + 0.1, case
        assert r["tau_clamped"] == [high, high], case
        module, master = r["tau_stepped"]
        assert module == pytest.approx(master, abs=1e-7) and module <= high + 2.5e-3, (case, r["tau_stepped"])

    # 1 -> 2 ranks (in bf16, the precision of GPU runs): each rank resumed the one rank's checkpoint
    for case in one:
        for r in results:
            again = r[f"{case}-resumed"]
            assert again["steps_loaded"] == 2 and again["lr_loaded"] == pytest.approx(one[case]["lr_saved"])
            assert again["loaded"] == pytest.approx(one[case]["saved"], rel=1e-12), case
            assert again["after"] == pytest.approx(one[case]["continued"], rel=1e-9), case


def _step(engine, batch, seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # the augmentations: the same draws for the two engines compared
    out = engine(batch)
    engine.backward(out["loss"])
    engine.step()


def _engine(cfg, task, seed: int):
    import torch

    from ctray.train.engine import build_engine

    torch.manual_seed(seed)  # identical init on every rank
    return build_engine(cfg, task, use_gpu=False)


def _resume(cfg, objective, batch, checkpoint: Path) -> tuple[dict, object]:
    """A fresh engine of another seed loads `checkpoint` and takes the third step."""
    from ctray.objectives.config import Assets
    from ctray.train.engine import load_checkpoint, param_checksum

    stage = cfg.deepspeed.zero_stage
    fresh, sched = _engine(cfg, objective.task(cfg.objective, Assets()), cfg.train.seed + 1)
    r = {"fresh": param_checksum(fresh.module, stage), "lr_fresh": sched.get_last_lr()[0]}
    load_checkpoint(fresh, checkpoint, stage)
    r |= {"loaded": param_checksum(fresh.module, stage), "steps_loaded": fresh.global_steps}
    r["lr_loaded"] = sched.get_last_lr()[0]
    _step(fresh, batch, 102)
    r |= {"after": param_checksum(fresh.module, stage), "steps_after": fresh.global_steps}
    return r, fresh


def _checkpoints(cfg, objective, out: Path, case: str) -> dict:
    """Save, load into an engine of another seed, step both: what the assertions compare."""
    import torch

    from ctray.objectives.config import Assets
    from ctray.train.engine import TAG, param_checksum

    stage = cfg.deepspeed.zero_stage
    batch = objective.synthetic_batch(cfg.objective, cfg.scans_per_worker, torch.device("cpu"))
    ckpt = str(out / f"zero{case}")  # shared by both ranks, as a run's storage is
    engine, sched = _engine(cfg, objective.task(cfg.objective, Assets()), cfg.train.seed)
    settings = ("overlap_comm", "reduce_bucket_size", "allgather_bucket_size")
    comm = [getattr(engine.optimizer, k, None) for k in settings]  # DeepSpeed's ZeRO 1-2 optimizer
    for i in range(2):
        _step(engine, batch, 100 + i)
    engine.save_checkpoint(ckpt, tag=TAG)
    r = {"saved": param_checksum(engine.module, stage), "steps_saved": engine.global_steps, "comm": comm}
    r["lr_saved"] = sched.get_last_lr()[0]
    _step(engine, batch, 102)
    r["continued"] = param_checksum(engine.module, stage)

    loaded, fresh = _resume(cfg, objective, batch, Path(ckpt))
    r |= loaded
    tensors = [*fresh.module.parameters(), *(b for b in fresh.module.buffers() if b.is_floating_point())]
    r["dtypes"] = sorted({str(t.dtype) for t in tensors})
    for e in (engine, fresh):
        e.destroy()
    return r


def _temperature(cfg, stage: int) -> dict:
    """The CA-GCL task's tau pushed past its bound in the optimizer's fp32 copy, clamped, stepped."""
    import deepspeed
    import torch
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    from ctray.objectives import get_objective
    from ctray.train.engine import gathered
    from ctray.train.optim import clamp_

    from helpers import tiny_task

    precision = cfg.deepspeed.precision
    task, tcfg, _ = tiny_task("cagcl", f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}")
    engine, _ = _engine(tcfg, task, 0)
    batch = get_objective("cagcl").synthetic_batch(tcfg.objective, tcfg.scans_per_worker, torch.device("cpu"))
    (tau, low, high), *_ = engine.module.clamped_parameters()

    def read() -> list[float]:
        master = safe_get_full_fp32_param(tau)  # collective under ZeRO; None where the optimizer steps tau itself
        with gathered(engine.module, stage):
            module = float(tau.detach()[0])
        return [module, module if master is None else float(master[0])]

    _step(engine, batch, 1)
    # As if a step had taken it there: the optimizer's copy (ZeRO 1-3) and the module's parameter.
    pushed = high + 0.137
    if stage == 3:  # each rank's partition of the copy (see clamp_)
        local = safe_get_local_fp32_param(tau)
        safe_set_local_fp32_param(tau, torch.full_like(local, pushed))
    elif stage > 0:
        safe_set_full_fp32_param(tau, torch.full((1,), pushed))
    with deepspeed.zero.GatheredParameters([tau], modifier_rank=0, enabled=stage == 3), torch.no_grad():
        tau.fill_(pushed)
    r = {"tau_pushed": min(read())}
    clamp_(tau, low, high, stage)
    r["tau_clamped"] = read()
    _step(engine, batch, 2)
    r["tau_stepped"] = read()
    engine.destroy()
    return r


def _worker(argv: list[str]) -> None:
    import json

    import torch

    from ctray.config import load_config
    from ctray.objectives import get_objective
    from ctray.train.config import PretrainConfig

    from helpers import init_rank

    rank, world, out, args = init_rank(argv)
    results = {}
    for stage in STAGES:
        for precision in args["precisions"]:
            extra = [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}"]
            cfg = load_config(PretrainConfig, None, [*args["overrides"], *extra])
            case = f"{stage}-{precision}"
            objective = get_objective(cfg.objective.name)
            results[case] = _checkpoints(cfg, objective, out, case)
            if world > 1:
                results[case] |= _temperature(cfg, stage)
            if args.get("resume") and precision == "bf16":  # another world size's checkpoint
                batch = objective.synthetic_batch(cfg.objective, cfg.scans_per_worker, torch.device("cpu"))
                resumed, engine = _resume(cfg, objective, batch, Path(args["resume"]) / f"zero{case}")
                engine.destroy()
                results[f"{case}-resumed"] = resumed
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":  # a rank of helpers.run_ranks, which puts tests/ (helpers) on PYTHONPATH
    _worker(sys.argv)
