"""The optimizer around every objective: AdamW groups without weight decay for temperatures,
biases, norms and embeddings (open_clip's rule), and a learnable temperature that can fall."""

import pytest
import torch
import torch.nn.functional as F

from ctray.objectives import objective_names
from ctray.objectives.losses import LearnableTemperature, bidirectional_infonce
from ctray.train.optim import clamp_, param_groups

from helpers import LOCAL_JOBS, tiny_task


@pytest.mark.parametrize("name", sorted(LOCAL_JOBS))
def test_parameter_groups_leave_norms_biases_embeddings_and_temperature_undecayed(name):
    assert set(LOCAL_JOBS) == set(objective_names())  # every registered objective is listed here
    task, _, _ = tiny_task(name)
    decay, keep = param_groups(task, 0.05)
    assert decay["weight_decay"] == 0.05 and keep["weight_decay"] == 0.0
    params = dict(task.named_parameters())
    assert set(decay["names"]) | set(keep["names"]) == set(params) and not set(decay["names"]) & set(keep["names"])
    assert all(params[n].ndim >= 2 for n in decay["names"])
    tables = (
        "word_embeddings.weight",
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        ".pos",
        ".queries",
    )
    learned = (".mask_token", ".proj_bias")
    assert all(n.endswith((".bias", *learned)) or params[n].ndim < 2 or n.endswith(tables) for n in keep["names"])
    assert not [n for n in decay["names"] if "norm" in n.lower() or n.endswith(tables)]
    if name in ("totalfm_clip", "cagcl"):
        assert "temperature.tau" in keep["names"]
        assert "text.bert.embeddings.word_embeddings.weight" in keep["names"]
        assert "text.bert.embeddings.position_embeddings.weight" in keep["names"]
        assert [p for p, _, _ in task.clamped_parameters()] == [task.temperature.tau]
    if name == "cagcl":
        assert {"vit.pos", "pool.queries", "pool.proj_bias"} <= set(keep["names"])
        assert "vit.patch_embed.weight" in decay["names"] and "pool.proj_weight" in decay["names"]
    if name == "totalfm_mae":
        assert "mae.mask_token" in keep["names"]  # VideoMAE's learned token (transformers names it so)
    if name in ("ctfm_simclr", "totalfm_mae"):
        assert task.clamped_parameters() == []


def test_temperature_falls_from_0_07_to_0_02_in_a_few_hundred_steps():
    """A toy CLIP batch of 64 pairs with a fixed small margin (positive cosine 0.80, every negative
    0.70): the loss keeps asking for a sharper softmax. With the temperature undecayed,
    parametrised as tau and clamped after the step (never in forward), AdamW at twice fVLM's lr
    takes it from 0.07 to below 0.02 within 200 steps (log(1/tau) at this lr needs thousands)."""
    n = 64
    shared = torch.eye(n + 1)[n].expand(n, -1)
    images = F.normalize(torch.eye(n + 1)[:n] + shared, dim=-1)
    texts = F.normalize(0.15 * torch.eye(n + 1)[:n] + shared, dim=-1)
    model = torch.nn.ModuleDict({"temperature": LearnableTemperature(0.07, 0.001, 0.5)})
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=2e-4)
    for _ in range(200):
        loss = bidirectional_infonce(images, texts, model["temperature"]())
        opt.zero_grad()
        loss.backward()
        opt.step()
        clamp_(model["temperature"].tau, *model["temperature"].bounds, zero_stage=0)
    assert model["temperature"].tau.item() < 0.02
