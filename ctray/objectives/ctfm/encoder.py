"""Vision encoders built from configs (random init; real runs may load exported weights)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class PooledSegResEncoder(nn.Module):
    """CT-FM's backbone: MONAI SegResEncoder; the last level average-pooled to a vector
    (init_filters * 2**(levels - 1) features: 512 for the paper's 32 and 5 levels).

    Input (N, 1, D, H, W) -> (N, out_features).
    """

    def __init__(self, init_filters: int = 32, blocks_down: tuple[int, ...] = (1, 2, 2, 4, 4)):
        # Imported here: importing MONAI loads all of it (~4 s), which loading a config, the
        # registry or `ctray --help` must not pay for.
        from monai.networks.nets.segresnet_ds import SegResEncoder

        super().__init__()
        self.encoder = SegResEncoder(
            spatial_dims=3, in_channels=1, init_filters=init_filters, blocks_down=tuple(blocks_down)
        )
        self.out_features = init_filters * 2 ** (len(blocks_down) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1].mean(dim=(2, 3, 4))


def mlp_head(dims: tuple[int, ...]) -> nn.Sequential:
    """Linear -> ReLU -> ... -> Linear (no batch norm, as CT-FM's 512 -> 256 -> 128 head)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
