"""Contrastive losses as pure modules: no I/O, no distributed state, shapes documented."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

P = ParamSpec("P")
R = TypeVar("R")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for the softmax (bf16 training); float64 stays float64, so that the checks
    against naive float64 loops hold to 1e-8 whatever the BLAS."""
    return x if x.dtype == torch.float64 else x.float()


def full_precision(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a loss with autocast off: under torch.autocast(bf16) the similarity matmuls would be cast
    back to bf16 whatever their inputs' dtype, and logits scaled by 1/tau up to 1000 in bf16 (8 bits
    of mantissa) would blur the softmax. The inputs are cast with `_fp32` inside."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        devices = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        with contextlib.ExitStack() as off:
            for device in devices:
                off.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


class IntraSampleNTXent(nn.Module):
    """CT-FM's intra-sample SimCLR loss (Pai et al., "Vision foundation models for computed
    tomography", Methods: "Intra-sample contrastive learning").

    For each scan s, the 2M projections of its M patches (two views each) form one NT-Xent problem:
    the positive of a view is the other view of the same patch, the negatives are the 2M - 2 views
    of the scan's other patches. No other scan contributes negatives. The loss is the mean over
    all 2M anchors (both directions) and then over scans.

    Input: z of shape (S, 2, M, D): S scans, 2 views, M patches, D features (not normalised).
    Output: scalar loss; and (in `forward_with_metrics`) the mean positive cosine similarity.

    Example:
        >>> loss = IntraSampleNTXent(temperature=0.1)
        >>> loss(torch.randn(4, 2, 15, 128)).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_with_metrics(z)[0]

    @full_precision
    def forward_with_metrics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 4 or z.shape[1] != 2:
            raise ValueError(f"expected z of shape (scans, 2, patches, dim), got {tuple(z.shape)}")
        s, _, m, _ = z.shape
        if m < 2:
            raise ValueError(
                "intra-sample NT-Xent needs at least 2 patches per scan (negatives come from the same scan)"
            )
        views = F.normalize(_fp32(z), dim=-1).reshape(s, 2 * m, -1)  # view v of patch p at v * M + p
        sim = views @ views.transpose(1, 2)  # (S, 2M, 2M) cosine similarities
        positive = (torch.arange(2 * m, device=z.device) + m) % (2 * m)
        logits = (sim / self.temperature).masked_fill(
            torch.eye(2 * m, dtype=torch.bool, device=z.device), float("-inf")
        )
        loss = F.cross_entropy(logits.reshape(s * 2 * m, 2 * m), positive.repeat(s))
        pos_sim = sim[:, torch.arange(2 * m, device=z.device), positive].mean()
        return loss, pos_sim.detach()


class LearnableTemperature(nn.Module):
    """The learnable temperature of fVLM (CA-GCL's code base): the parameter is tau itself (init
    0.07, range 0.001..0.5) and logits are similarities / tau. forward() -> the logit scale 1/tau,
    a scalar tensor.

    As in fVLM and open_clip the range is kept by clamping the parameter in place (`bounds`, through
    Task.clamped_parameters: the trainer does it after each optimizer step), so its gradient flows
    even at a bound; a clamp inside forward would zero it there. Parametrised as tau (fVLM), not
    open_clip's log(1/tau): AdamW moves a parameter by about lr per step, so tau falls from 0.07 to
    0.01 in ~600 steps at fVLM's lr of 1e-4, where log(1/tau) would need ~19,000."""

    def __init__(self, init: float = 0.07, tau_min: float = 0.001, tau_max: float = 0.5):
        super().__init__()
        if not tau_min <= init <= tau_max:
            raise ValueError(f"temperature init {init} outside [{tau_min}, {tau_max}]")
        # Shape (1,), not (): DeepSpeed's flattening cannot view a 0-dim parameter.
        self.tau = nn.Parameter(torch.full((1,), float(init)))
        self.bounds = (float(tau_min), float(tau_max))

    def forward(self) -> torch.Tensor:
        return 1.0 / self.tau[0]


@full_precision
def bidirectional_infonce(
    v: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """-1/N sum_i [log softmax_k <v_i, r_k> s + log softmax_k <v_k, r_i> s] at the positive:
    the two-direction InfoNCE of CA-GCL eq. (1) and (4) (a sum of the two directions, as written).

    v, r: (N, D), L2-normalised, row i of v pairs with row i of r. scale: scalar 1/tau.
    targets: optional (N, N) soft targets, rows summing to 1 and symmetric (fVLM's calibration of
    false negatives); None means the identity.
    """
    logits = scale * _fp32(v) @ _fp32(r).T
    if targets is None:
        labels = torch.arange(len(v), device=v.device)
        return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
    return -(targets * logits.log_softmax(1)).sum(1).mean() - (targets.T * logits.T.log_softmax(1)).sum(1).mean()


def false_negative_targets(text_hash: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """fVLM's soft targets: samples whose texts are identical, or whose anatomy is normal in both
    (abnormal == 0), are positives of each other, weighted equally. (..., N), (..., N) -> (..., N, N)."""
    same = (text_hash[..., :, None] == text_hash[..., None, :]) | (
        (abnormal[..., :, None] == 0) & (abnormal[..., None, :] == 0)
    )
    same = same | torch.eye(same.shape[-1], dtype=torch.bool, device=same.device)
    t = same.float()
    return t / t.sum(-1, keepdim=True)


@full_precision
def masked_infonce(
    v: torch.Tensor, r: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """bidirectional_infonce over the rows where `keep` is True, in every leading batch position at
    once, with no size that depends on `keep`: the step reads nothing back from the device (a
    boolean index or a count would, once per call). Rows outside `keep` are masked out of the
    softmax and the mean; fewer than 2 kept rows give 0 (1 row is its own only candidate: 0 with
    zero gradient, as bidirectional_infonce on it).

    v, r: (..., N, D) L2-normalised; keep: (..., N) bool; scale: scalar 1/tau; targets: optional
    (..., N, N) soft targets (false_negative_targets), renormalised over the kept rows. -> (...)."""
    logits = scale * _fp32(v) @ _fp32(r).transpose(-1, -2)
    pair = keep[..., :, None] & keep[..., None, :]
    if targets is None:
        targets = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    targets = targets * pair
    targets = targets / targets.sum(-1, keepdim=True).clamp(min=1e-12)  # rows outside `keep`: all 0
    # A finite floor, not -inf: 0 x -inf would be nan in the weighted sums and their gradients.
    masked = logits.masked_fill(~pair, torch.finfo(logits.dtype).min)
    rows = -(targets * masked.log_softmax(-1)).sum(-1)
    cols = -(targets.transpose(-1, -2) * masked.transpose(-1, -2).log_softmax(-1)).sum(-1)
    return ((rows + cols) * keep).sum(-1) / keep.sum(-1).clamp(min=1)


class AnatomyLocalLoss(nn.Module):
    """Anatomy-wise vision-text InfoNCE: CA-GCL eq. (1) (Sec. 2.2, "local alignment", after fVLM)
    and TotalFM's organ-wise volume-text contrast, which is the same loss over organ volumes.

    For anatomy j, the N_j samples that have both its image region and a text form one two-way
    InfoNCE problem; negatives are the same anatomy in other samples only. Anatomies with fewer
    than 2 samples have no negatives and contribute 0. All anatomies in one masked batch
    (masked_infonce), so the step asks the device for no N_j.

    Inputs: v, r (B, A, D) L2-normalised anatomy embeddings; present (B, A) bool; scale: 1/tau;
    optional text_hash (B, A) int64 and abnormal (B, A) int8 for soft targets.
    Output: (A,) the per-anatomy losses L_loc^(j) (CA-GCL sums them, eq. 5).
    """

    def __init__(self, soft_targets: bool = False):
        super().__init__()
        self.soft_targets = soft_targets

    def forward(
        self,
        v: torch.Tensor,
        r: torch.Tensor,
        present: torch.Tensor,
        scale: torch.Tensor,
        text_hash: torch.Tensor | None = None,
        abnormal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        targets = None
        if self.soft_targets:
            if text_hash is None or abnormal is None:
                raise ValueError("soft targets need text_hash and abnormal")
            targets = false_negative_targets(text_hash.T, abnormal.T)  # (A, B, B)
        return masked_infonce(v.transpose(0, 1), r.transpose(0, 1), present.T.bool(), scale, targets)


class CrossAnatomyGlobalLoss(nn.Module):
    """CA-GCL's global loss, eq. (2)-(4) (Sec. 2.2, "cross-anatomy global contrast").

    Per anatomy j an independent random permutation pi_j of the B samples; synthetic group k takes
    sample pi_j(k)'s anatomy j for every j, so each anatomy token is used exactly once and there are
    K = B groups. Group embeddings are the mean over anatomies (eq. 3; here over the anatomies
    present in the drawn sample, since real scans miss some), re-normalised because <.,.> is the
    cosine; then the two-way InfoNCE over the K groups (eq. 4). Groups with no anatomy are dropped.

    Inputs: v, r (B, A, D) L2-normalised; present (B, A) bool; scale 1/tau; generator for the
    permutations (seeded identically on every worker, after the gather). Output: scalar.
    """

    @staticmethod
    def permutations(b: int, a: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """(A, B): row j is pi_j."""
        return torch.stack([torch.randperm(b, generator=generator) for _ in range(a)]).to(device)

    @full_precision
    def forward(
        self,
        v: torch.Tensor,
        r: torch.Tensor,
        present: torch.Tensor,
        scale: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        b, a = present.shape
        perm = self.permutations(b, a, generator, v.device)  # (A, K=B)
        cols = torch.arange(a, device=v.device)[:, None]
        w = present[perm, cols].T.float()  # (K, A): group k's anatomy j is present
        vg = (v[perm, cols].transpose(0, 1) * w[..., None]).sum(1)  # (K, D)
        rg = (r[perm, cols].transpose(0, 1) * w[..., None]).sum(1)
        keep = w.sum(1) > 0  # masked, not indexed: the step reads no count back from the device
        vg, rg = F.normalize(_fp32(vg), dim=-1), F.normalize(_fp32(rg), dim=-1)
        return masked_infonce(vg, rg, keep, scale)
