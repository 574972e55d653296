"""CT-FM's device side: window, two augmented views per patch, SegResEncoder + MLP head, and the
intra-sample NT-Xent over each scan's 2M views."""

from __future__ import annotations

import torch

from ctray.objectives.ctfm.augment import gaussian_smooth, histogram_shift, resized_crop_flip, window
from ctray.objectives.ctfm.config import CTFMConfig
from ctray.objectives.ctfm.encoder import PooledSegResEncoder, mlp_head
from ctray.objectives.losses import IntraSampleNTXent
from ctray.objectives.spec import Assets, ExportPart, Task


def synthetic_batch(cfg: CTFMConfig, scans: int, device: torch.device) -> dict[str, torch.Tensor]:
    """In-memory input of the right shape and dtype, for measuring the step without the data path."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    patches = torch.randint(
        int(cfg.window_hu[0]),
        int(cfg.window_hu[1]),
        (scans, cfg.patches_per_scan, *cfg.patch_size),
        dtype=torch.int16,
        generator=gen,
    )
    return {"patches": patches.to(device)}


class CTFMTask(Task):
    """Model + augmentation + loss: batch {"patches": (S, M, d, h, w) int16} -> dict of losses/metrics."""

    def __init__(self, cfg: CTFMConfig, assets: Assets | None = None):
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
        # Both views of every patch go through the encoder in one call, so BatchNorm (SyncBatchNorm
        # across ranks) normalises them with one batch's statistics, as SimCLR's own implementation
        # does with its concatenated views. CT-FM's released code encodes the views in separate calls;
        # one call keeps the GPU's kernels full (one launch per layer, twice the batch) and is kept.
        x = self.views(patches)
        if x.is_cuda:  # cuDNN picks its fast 3D kernels for channels-last input (measured ~2x on an H100)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        z = self.head(self.encoder(x.to(self.compute_dtype())))
        loss, pos_sim = self.loss.forward_with_metrics(z.reshape(s, 2, m, -1))
        return {"loss": loss, "positive_cosine": pos_sim, "views": torch.tensor(float(s * 2 * m))}

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"patches": (S, M, d, h, w) int16 HU} -> "patch_embedding" (S, M, F): each patch windowed,
        not augmented, through the encoder (mean of its last level, the features the head sees in
        training); "embedding" (S, F): their mean over the scan's patches."""
        patches = batch["patches"]
        s, m = patches.shape[:2]
        x = window(patches, *self.cfg.window_hu).reshape(s * m, 1, *patches.shape[2:])
        z = self.encoder(x.to(self.compute_dtype())).float().reshape(s, m, -1)
        return {"embedding": z.mean(1), "patch_embedding": z}

    def export_parts(self) -> dict[str, ExportPart]:
        kwargs = {"spatial_dims": 3, "in_channels": 1, "init_filters": self.cfg.init_filters}
        return {
            "encoder": ExportPart(
                self.encoder.encoder,
                "monai.networks.nets.segresnet_ds.SegResEncoder",
                {**kwargs, "blocks_down": list(self.cfg.blocks_down)},
            ),
            "head": ExportPart(
                self.head,
                "ctray.objectives.ctfm.encoder.mlp_head",
                {"dims": [self.encoder.out_features, *self.cfg.head_dims]},
            ),
        }

    def export_config(self) -> dict:
        return {
            "vision_part": "encoder",
            "embedding": "SegResEncoder(x)[-1].mean over (d, h, w): (N, init_filters * 2**(levels-1)); "
            "the head (projection for the contrastive loss) is exported separately",
            "input": {
                "orientation": "SPL",
                "spacing_zyx_mm": [3.0, 1.0, 1.0],
                "window_hu": list(self.cfg.window_hu),
                "window_to": [0.0, 1.0],
                "patch_size": list(self.cfg.patch_size),
                "shape": "(N, 1, d, h, w), each of d, h, w a multiple of 16",
            },
        }
