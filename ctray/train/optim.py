"""The optimizer around a task: AdamW parameter groups with and without weight decay, the
warmup-cosine schedule, and the in-place clamp of bounded parameters after each step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LEARNED_TOKENS = frozenset({"mask_token", "cls_token", "dist_token", "pos_embed"})
"""Parameter names timm's `no_weight_decay()` lists and transformers' models hold as learned
tokens: multi-dimensional, so the ndim rule would decay them."""


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameters AdamW must not decay (open_clip's and timm's rule): every parameter of fewer
    than 2 dimensions (biases, norm scales, a learnable temperature), every nn.Embedding table
    (BERT's token, position and token-type embeddings), and what a submodule lists in its own
    `no_weight_decay()` (a ViT's position embedding, learned query tokens), and the learned tokens
    of library models by name (LEARNED_TOKENS: transformers' VideoMAE `mask_token`, timm's)."""
    out = {name for name, p in module.named_parameters() if p.ndim < 2 or name.rsplit(".", 1)[-1] in LEARNED_TOKENS}
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(sub, nn.Embedding):
            out |= {f"{dot}{n}" for n, _ in sub.named_parameters(recurse=False)}
        listed = getattr(sub, "no_weight_decay", None)
        if callable(listed):
            out |= {f"{dot}{n}" for n in listed()}
    return out


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and the rest (no_decay_names) with weight_decay 0. Each
    group carries the parameter names (`names`), for logs and tests."""
    skip = no_decay_names(module)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if n not in skip]
    keep = [(n, p) for n, p in named if n in skip]
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in keep], "names": [n for n, _ in keep], "weight_decay": 0.0},
    ]


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warmup over `warmup` steps, then cosine to `min_ratio` at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def clamp_(param: nn.Parameter, low: float, high: float, zero_stage: int) -> None:
    """Clamp a parameter in place after the optimizer step (fVLM's and open_clip's
    `logit_scale.clamp_`), so its gradient keeps flowing at the bound. Under ZeRO 1-3 the optimizer
    steps an fp32 copy and writes it back into the model: that copy is clamped too (under ZeRO 0 the
    parameter is the optimizer's own). Collective under ZeRO-3: every rank calls it.

    ZeRO-3 clamps each rank's partition of the copy where it lies: DeepSpeed's full-parameter setter
    cannot write a parameter with fewer elements than ranks (a temperature of shape (1,) on 2 ranks:
    "start (1) + length (1) exceeds dimension size (1)"), and a clamp is elementwise anyway."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    if zero_stage == 3:
        import deepspeed

        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(low, high))
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.clamp_(low, high)
        return
    master = safe_get_full_fp32_param(param)  # None without ZeRO: the optimizer owns `param` itself
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(low, high))
    param.clamp_(low, high)
