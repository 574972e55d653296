"""Contrastive losses as pure modules: no I/O, no distributed state, shapes documented."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward_with_metrics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 4 or z.shape[1] != 2:
            raise ValueError(f"expected z of shape (scans, 2, patches, dim), got {tuple(z.shape)}")
        s, _, m, _ = z.shape
        if m < 2:
            raise ValueError("intra-sample NT-Xent needs at least 2 patches per scan (negatives come from the same scan)")
        views = F.normalize(z.float(), dim=-1).reshape(s, 2 * m, -1)  # view v of patch p at v * M + p
        sim = views @ views.transpose(1, 2)  # (S, 2M, 2M) cosine similarities
        positive = (torch.arange(2 * m, device=z.device) + m) % (2 * m)
        logits = (sim / self.temperature).masked_fill(torch.eye(2 * m, dtype=torch.bool, device=z.device), float("-inf"))
        loss = F.cross_entropy(logits.reshape(s * 2 * m, 2 * m), positive.repeat(s))
        pos_sim = sim[:, torch.arange(2 * m, device=z.device), positive].mean()
        return loss, pos_sim.detach()
