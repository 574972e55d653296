"""DeepSpeed checkpoints of every ZeRO stage load back exactly, in one 2-process gloo group.

The test starts this file twice as a script (rank 0 and rank 1, DS_ACCELERATOR=cpu); inside that
one process group, for each ZeRO stage, each rank builds the real ctfm_simclr task and engine
(ctray.train.loop.build_engine), takes 2 steps, saves a checkpoint, then loads it into a fresh
engine built from another seed, and takes a third step on both. Each rank writes what it measured
to a JSON file; the assertions are made here, in the test process. (The Ray Train resume path is
tested by test_pretrain.py::test_killed_worker_resumes_from_last_checkpoint.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs of a minute or more: the slow tier

STAGES = (0, 1, 2, 3)
WORLD = 2


def test_zero_checkpoints_load_back(tmp_path):
    from conftest import free_port
    from test_pretrain import TINY

    port = free_port()
    overrides = json.dumps([*TINY, "data.shards=unused", "train.max_steps=10"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.log", "w") as log:  # the child writes to its own copy of the file
            args = [sys.executable, __file__, str(rank), str(port), str(tmp_path), overrides]
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + 300
    # One rank failing leaves the other waiting in a collective: stop it as soon as one fails.
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    killed = {rank for rank, p in enumerate(procs) if p.poll() is None}
    for rank in killed:
        procs[rank].kill()
    for p in procs:
        p.wait()
    for rank in sorted(range(WORLD), key=lambda rank: rank in killed):  # the rank that failed first
        if procs[rank].returncode != 0:
            why = "killed: the other rank failed, or 300 s passed" if rank in killed else "failed"
            out = (tmp_path / f"rank{rank}.log").read_text()
            pytest.fail(f"rank {rank} {why}:\n{out[-6000:]}", pytrace=False)

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [sorted(r) for r in results] == [[str(s) for s in STAGES]] * WORLD
    for stage in map(str, STAGES):
        r, other = results[0][stage], results[1][stage]
        assert r["steps_saved"] == 2
        assert r["fresh"] != pytest.approx(r["saved"], rel=1e-6)  # the fresh engine started elsewhere
        assert r["loaded"] == pytest.approx(r["saved"], rel=1e-12), stage
        assert r["steps_loaded"] == 2 and r["steps_after"] == 3
        assert r["after"] != pytest.approx(r["loaded"], rel=1e-9)  # and it trains on
        # with the optimizer's moments and the lr schedule: its third step is the original engine's
        assert r["after"] == pytest.approx(r["continued"], rel=1e-9), stage
        assert r["lr_loaded"] == pytest.approx(r["lr_saved"]) and r["lr_saved"] != pytest.approx(r["lr_fresh"])
        # clamped to 1e-3, then one AdamW step (lr 2e-3 at most): far below the unclamped bias
        assert r["bias_before"] > 0.02 and r["bias_after"] < 1e-3 + 2.5e-3, (stage, r["bias_before"], r["bias_after"])
        # ZeRO shards the state, not the model: both ranks see the same parameters
        for k in ("saved", "loaded", "after"):
            assert other[k] == pytest.approx(r[k], rel=1e-12), (stage, k)


def _step(engine, batch, seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # the augmentations: the same draws for the two engines compared
    out = engine(batch)
    engine.backward(out["loss"])
    engine.step()


def _engine(cfg, objective, seed: int):
    import torch

    from ctray.train.loop import build_engine

    torch.manual_seed(seed)  # identical init on every rank
    return build_engine(cfg, objective.task(cfg.objective, {}), use_gpu=False)


def _worker(rank: int, port: int, out: Path, overrides: list[str]) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from datetime import timedelta

    import torch

    from ctray.config import load_config
    from ctray.objectives import get_objective
    from ctray.train.config import PretrainConfig
    from ctray.train.loop import TAG, gathered, param_checksum
    from ctray.train.optim import clamp_

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    results = {}
    for stage in STAGES:
        cfg = load_config(PretrainConfig, None, [*overrides, f"deepspeed.zero_stage={stage}"])
        objective = get_objective(cfg.objective.name)
        batch = objective.synthetic_batch(cfg.objective, cfg.scans_per_worker, torch.device("cpu"))

        ckpt = str(out / f"zero{stage}")  # shared by both ranks, as a run's storage is
        engine, sched = _engine(cfg, objective, cfg.train.seed)
        for i in range(2):
            _step(engine, batch, 100 + i)
        engine.save_checkpoint(ckpt, tag=TAG)
        r = {
            "saved": param_checksum(engine.module, stage),
            "steps_saved": engine.global_steps,
            "lr_saved": sched.get_last_lr()[0],
        }
        _step(engine, batch, 102)
        r["continued"] = param_checksum(engine.module, stage)

        fresh, fresh_sched = _engine(cfg, objective, cfg.train.seed + 1)
        r["fresh"], r["lr_fresh"] = param_checksum(fresh.module, stage), fresh_sched.get_last_lr()[0]
        fresh.load_checkpoint(ckpt, tag=TAG)
        r |= {
            "loaded": param_checksum(fresh.module, stage),
            "steps_loaded": fresh.global_steps,
            "lr_loaded": fresh_sched.get_last_lr()[0],
        }
        _step(fresh, batch, 102)
        r |= {"after": param_checksum(fresh.module, stage), "steps_after": fresh.global_steps}
        # A bounded parameter (as a learnable temperature) clamped after the step: the optimizer's
        # fp32 master copy is clamped too, so the next step starts from the clamped value.
        bias = dict(fresh.module.named_parameters())["head.2.bias"]
        with gathered(fresh.module, stage):
            r["bias_before"] = float(bias.detach().abs().max())
        clamp_(bias, -1e-3, 1e-3, stage)
        _step(fresh, batch, 103)
        with gathered(fresh.module, stage):
            r["bias_after"] = float(bias.detach().abs().max())
        results[stage] = r
        for e in (engine, fresh):
            e.destroy()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))
