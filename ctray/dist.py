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


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient contiguous. torch.distributed.nn's
    all_gather, on gloo, receives the gradients of the other workers' slices (an all-to-all made
    of scatters) into `empty_like(gradient)`, which keeps the strides of a transposed gradient,
    and the scatter fills it as if it were contiguous: a loss that transposed the gathered batch
    (losses.masked_infonce, anatomy-major) got other gradients than in one process (seen in
    tests/integration/test_uneven_ranks.py)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0, keeping gradients flowing to each worker's
    own slice (torch.distributed.nn.all_gather), so that a loss over the gathered batch equals
    the single-process loss on the full batch."""
    if not is_dist() or world_size() == 1:
        return x
    from torch.distributed.nn import all_gather

    return torch.cat([_ContiguousGrad.apply(part) for part in all_gather(x)], dim=0)


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
