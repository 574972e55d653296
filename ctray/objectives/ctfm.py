"""CT-FM intra-sample SimCLR (Pai et al. 2025; public code: project-lighter/CT-FM).

CPU side (Ray Data map_batches): M random patches per scan, sliced out of the stored int16
volume (padded with -1024 HU where the scan is smaller than a patch). Device side: window,
two augmented views per patch (ctray.objectives.augment), SegResEncoder + MLP head, and the
intra-sample NT-Xent over each scan's 2M views.

Defaults follow the paper (20 patches of 24x128x128 per scan, 16 scans per global batch,
temperature 0.1); the released repository uses 15 patches of 32x128x128.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ctray.config import Section
from ctray.data.samplers import PatchSampler
from ctray.models.encoders import PooledSegResEncoder, mlp_head
from ctray.objectives.augment import gaussian_smooth, histogram_shift, resized_crop_flip, window
from ctray.objectives.losses import IntraSampleNTXent


class CTFMConfig(Section):
    """CT-FM intra-sample SimCLR."""

    name: Literal["ctfm_simclr"] = "ctfm_simclr"
    patches_per_scan: int = 20
    """M: patches sampled from each scan per step (paper 20; released repo 15)."""
    patch_size: tuple[int, int, int] = (24, 128, 128)
    """Patch size in voxels (z, y, x) at 3 x 1 x 1 mm (paper 24x128x128; released repo 32x128x128)."""
    temperature: float = 0.1
    """NT-Xent temperature."""
    window_hu: tuple[float, float] = (-1024.0, 2048.0)
    """HU range mapped to 0..1 (clipped)."""
    crop_scale: tuple[float, float] = (0.33, 1.0)
    """Random resized crop: fraction of the patch volume kept before resizing back."""
    flip_prob: float = 0.5
    """Probability of flipping a view along z (axis 0)."""
    histogram_shift_prob: float = 0.5
    """Probability of MONAI-style histogram shift."""
    histogram_control_points: int = 5
    """Control points of the histogram shift."""
    smooth_prob: float = 0.5
    """Probability of Gaussian smoothing."""
    smooth_sigma: tuple[float, float] = (0.25, 1.5)
    """Range of the Gaussian sigma (voxels), drawn per axis."""
    init_filters: int = 32
    """SegResEncoder width (512 features at the last of 5 levels)."""
    blocks_down: tuple[int, ...] = (1, 2, 2, 4, 4)
    """SegResEncoder blocks per level."""
    head_dims: tuple[int, ...] = (256, 128)
    """Projection head after the pooled encoder features (512 -> 256 -> 128)."""


def patch_sampler(cfg: CTFMConfig, assets: dict | None = None, seed: int | None = None) -> PatchSampler:
    return PatchSampler(cfg.patches_per_scan, tuple(cfg.patch_size), int(cfg.window_hu[0]), seed)


def synthetic_batch(cfg: CTFMConfig, scans: int, device: torch.device) -> dict[str, torch.Tensor]:
    """In-memory input of the right shape and dtype, for measuring the step without the data path."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    patches = torch.randint(int(cfg.window_hu[0]), int(cfg.window_hu[1]), (scans, cfg.patches_per_scan, *cfg.patch_size), dtype=torch.int16, generator=gen)
    return {"patches": patches.to(device)}


class CTFMTask(nn.Module):
    """Model + augmentation + loss: batch {"patches": (S, M, d, h, w) int16} -> dict of losses/metrics."""

    def __init__(self, cfg: CTFMConfig, assets: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = PooledSegResEncoder(cfg.init_filters, cfg.blocks_down)
        self.head = mlp_head((self.encoder.out_features, *cfg.head_dims))
        self.loss = IntraSampleNTXent(cfg.temperature)

    @torch.no_grad()
    def views(self, patches: torch.Tensor) -> torch.Tensor:
        """(S, M, d, h, w) int16 HU -> (S * 2 * M, 1, d, h, w) augmented views in [0, 1]."""
        s, m = patches.shape[:2]
        x = window(patches, *self.cfg.window_hu).reshape(s * m, 1, *patches.shape[2:])
        x = torch.cat([x, x])  # view 0 of every patch, then view 1
        x = resized_crop_flip(x, self.cfg.crop_scale, self.cfg.flip_prob)
        x = histogram_shift(x, self.cfg.histogram_shift_prob, self.cfg.histogram_control_points)
        x = gaussian_smooth(x, self.cfg.smooth_prob, self.cfg.smooth_sigma)
        # (2, S, M) order -> (S, 2, M) so that each scan's views are contiguous
        return x.reshape(2, s, m, *x.shape[1:]).transpose(0, 1).reshape(s * 2 * m, *x.shape[1:])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        patches = batch["patches"]
        s, m = patches.shape[:2]
        x = self.views(patches)
        if x.is_cuda:  # cuDNN picks its fast 3D kernels for channels-last input (DESIGN.md 5)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        param = next(self.parameters())
        z = self.head(self.encoder(x.to(param.dtype)))
        loss, pos_sim = self.loss.forward_with_metrics(z.reshape(s, 2, m, -1))
        return {"loss": loss, "positive_cosine": pos_sim, "views": torch.tensor(float(s * 2 * m))}

    def export_module(self) -> nn.Module:
        return self.encoder

    def export_config(self) -> dict:
        return {
            "architecture": "monai.networks.nets.segresnet_ds.SegResEncoder",
            "kwargs": {"spatial_dims": 3, "in_channels": 1, "init_filters": self.cfg.init_filters, "blocks_down": list(self.cfg.blocks_down)},
            "pooling": "mean of the last level",
            "input": {"orientation": "SPL", "spacing_zyx_mm": [3.0, 1.0, 1.0], "window_hu": list(self.cfg.window_hu), "patch_size": list(self.cfg.patch_size)},
        }
