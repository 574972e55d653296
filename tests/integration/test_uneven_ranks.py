"""Ranks whose batches differ run the same collectives: 2 processes (gloo), each with the real task
in a real DeepSpeed engine, where rank 1's half of the batch has no report text (CA-GCL) or no
organ at all (TotalFM stage 2, and stage 1's organ volumes). Before ctray kept every tower on the
graph, the rank without text skipped the backward of the embeddings' all-gather and both ranks
waited forever.

Each rank takes a step and writes the gradients DeepSpeed averaged; the test compares them with one
process computing the same loss on the whole batch (dropout off, the same permutations): the
gradient of the gathered loss, averaged over 2 ranks, is the single-process gradient. bf16 under
ZeRO 2 and 3 must complete the same step.
"""

from __future__ import annotations

import sys

import pytest

SCANS = 4  # the whole batch; rank r holds scans [2r, 2r + 2)
CASES = {
    # name: the objective, the rank-1 batch fields set to 0, the engines (stage, precision)
    "cagcl-no-text": ("cagcl", ("has_text",), [(0, "fp32"), (2, "bf16"), (3, "bf16")]),
    "totalfm_clip-no-organ": ("totalfm_clip", ("present", "region"), [(0, "fp32")]),
    "totalfm_mae-no-organ": ("totalfm_mae", ("present", "region"), [(0, "fp32")]),
}


def _batch(name: str, cfg, empty: tuple[str, ...]) -> dict:
    """The whole batch, with rank 1's scans lacking what `empty` names."""
    import torch

    from ctray.objectives import get_objective

    batch = get_objective(name).synthetic_batch(cfg.objective, SCANS, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    if "text_ids" in batch:  # different texts per slot, some of them repeated (soft targets)
        batch["text_hash"] = torch.randint(0, 5, batch["text_hash"].shape, generator=g)
    for key in empty:
        batch[key][SCANS // 2 :] = 0
    return batch


def _task(name: str, *overrides: str):
    import torch

    from helpers import tiny_task

    torch.manual_seed(0)
    task, cfg, _ = tiny_task(name, "scaling.num_workers=2", "data.scans_per_batch=4", *overrides)
    return task.eval(), cfg  # no dropout: the ranks and the reference draw nothing


def _forward(task, batch):
    """`task` is the task, or the DeepSpeed engine around it."""
    import torch

    getattr(task, "module", task).begin_step(0, 123)  # CA-GCL's permutations: the same in every process
    torch.manual_seed(5)  # stage 1's masking
    return task(batch)["loss"]


def reference(case: str) -> dict:
    """One process, the whole batch: loss and gradients."""
    name, empty, _ = CASES[case]
    task, cfg = _task(name)
    task.zero_grad()
    loss = _forward(task, _batch(name, cfg, empty))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    return {"loss": float(loss), "grads": grads}


@pytest.mark.timeout(240)
def test_a_rank_without_text_or_organs_steps_with_the_others_and_the_single_process_gradient(tmp_path):
    import torch

    from helpers import run_ranks

    results = run_ranks(__file__, tmp_path, list(CASES))
    for case, (name, _, engines) in CASES.items():
        for stage, precision in engines:
            key = f"{case}-{stage}-{precision}"
            r0, r1 = results[0][key], results[1][key]
            assert r0["finite"] and r1["finite"] and r0["moved"] == r1["moved"] > 0, key
        expected = reference(case)
        got = [torch.load(tmp_path / f"{case}-rank{r}.pt") for r in range(2)]
        if name == "totalfm_mae":
            # Stage 1's loss is each rank's own (no gather): DeepSpeed averages rank 0's gradient
            # with rank 1's zeros; the reference holds rank 0's scans and rank 1's slots, all empty.
            expected["grads"] = {n: g / 2 for n, g in expected["grads"].items()}
        else:  # every rank computes the loss of the gathered batch: the reference's loss
            assert results[0][f"{case}-0-fp32"]["loss"] == pytest.approx(expected["loss"], rel=1e-5), case
        assert got[0].keys() == got[1].keys() == expected["grads"].keys(), case
        for n, g in expected["grads"].items():
            assert torch.equal(got[0][n], got[1][n]), (case, n)  # averaged: the same on both ranks
            assert torch.allclose(got[0][n], g, rtol=1e-4, atol=1e-5), (case, n, (got[0][n] - g).abs().max())
        text = [n for n in expected["grads"] if n.startswith("text.")]
        assert name == "totalfm_mae" or (text and any(expected["grads"][n].abs().sum() > 0 for n in text)), case


def _worker(argv: list[str]) -> None:
    import json

    import torch

    from ctray.train.engine import build_engine, gathered

    from helpers import init_rank

    rank, _, out, cases = init_rank(argv)
    results = {}
    for case in cases:
        name, empty, engines = CASES[case]
        for stage, precision in engines:
            task, cfg = _task(name, f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}")
            before = [p.detach().clone() for p in task.parameters()]
            engine, _ = build_engine(cfg, task, use_gpu=False)
            batch = {k: v[rank * 2 : rank * 2 + 2] for k, v in _batch(name, cfg, empty).items()}
            loss = _forward(engine, batch)
            engine.backward(loss)
            key = f"{case}-{stage}-{precision}"
            if stage == 0:  # the gradients DeepSpeed averaged over the ranks
                grads = {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None}
                torch.save(grads, out / f"{case}-rank{rank}.pt")
            engine.step()
            with torch.no_grad(), gathered(engine.module, stage):
                moved = sum(
                    int(not torch.equal(a, b.detach())) for a, b in zip(before, engine.module.parameters(), strict=True)
                )
            results[key] = {"loss": float(loss), "finite": bool(torch.isfinite(loss)), "moved": moved}
            engine.destroy()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":  # a rank of helpers.run_ranks, which puts tests/ (helpers) on PYTHONPATH
    _worker(sys.argv)
