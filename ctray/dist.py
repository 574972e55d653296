"""The one small distributed helper: rank, world size, rank-zero-only, all-reduce for logging,
and gather with autograd for contrastive losses across workers (open_clip's gather_features)."""

from __future__ import annotations

from typing import Any, ParamSpec, TypeVar

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def mean_across_workers(value: float, device: torch.device) -> float:
    """Average a scalar over workers (for logging only; no autograd)."""
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def max_across_workers(value: float, device: torch.device) -> float:
    """The largest of a scalar over workers (for logging only; no autograd)."""
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0, keeping gradients flowing to each worker's
    own slice (torch.distributed.nn.all_gather), so that a loss over the gathered batch equals
    the single-process loss on the full batch."""
    if not is_dist() or world_size() == 1:
        return x
    from torch.distributed.nn import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0, without autograd (masks, ids, labels)."""
    if not is_dist() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_object(obj: T) -> list[T]:
    """Every worker's `obj` (picklable), in rank order."""
    if not is_dist() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
