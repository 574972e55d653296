"""TotalFM stage 1 on the device: tube masking and transformers' VideoMAEForPreTraining (1 channel,
tubelet 2, patch 16, normalised-pixel MSE) over the batch's organ volumes."""

from __future__ import annotations

import torch
from torch import nn

from ctray.objectives.slots import anatomy_embeddings, at_slots
from ctray.objectives.spec import Assets, Batch, ExportPart, Task
from ctray.objectives.totalfm.config import OrganInput, TotalFMMAEConfig, VideoMAESize, export_config


def synthetic_batch(organs: OrganInput, scans: int, device: torch.device) -> Batch:
    """Random organ volumes (every organ present)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = len(organs.anatomies)
    batch = {
        "organs": torch.rand((scans, a, *organs.size), generator=gen).half(),
        "present": torch.ones((scans, a), dtype=torch.uint8),
        "region": torch.ones((scans, a), dtype=torch.uint8),
    }
    return {k: v.to(device) for k, v in batch.items()}


def tube_mask(n: int, cfg: VideoMAESize, organs: OrganInput, ratio: float, device: torch.device) -> torch.Tensor:
    """(n, tokens) bool, True = masked: the same random spatial patches in every tubelet (VideoMAE's
    tube masking), exactly round(ratio * patches) per volume (at most all but one) so the batch stays rectangular."""
    t, h, _ = organs.size
    spatial = (h // cfg.patch_size) ** 2
    masked = min(spatial - 1, round(ratio * spatial))  # at least one visible patch
    order = torch.rand(n, spatial, device=device).argsort(1)
    mask = torch.zeros(n, spatial, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :masked], True)
    return mask.repeat(1, t // cfg.tubelet_size)


def organ_videos(organs: torch.Tensor, present: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(S, A, T, H, W) + present (S, A) -> (N, T, 1, H, W): the present organ volumes as 1-channel videos."""
    return organs[present.bool()].unsqueeze(2).to(dtype)


class TotalFMMAETask(Task):
    """Batch {"organs": (S, A, T, H, W) float16 in [0, 1], "present": (S, A)} -> VideoMAE loss."""

    def __init__(self, cfg: TotalFMMAEConfig, assets: Assets | None = None):
        super().__init__()
        from transformers import VideoMAEForPreTraining

        self.cfg = cfg
        self.mae = VideoMAEForPreTraining(cfg.model.videomae_config(cfg.organs))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        present = batch["present"].bool()
        # A batch without an organ still runs the model, on its first slot weighted 0: every rank
        # then reduces every gradient (DeepSpeed), or the ranks that have organs would wait for it.
        empty = not bool(present.any())
        if empty:
            present = torch.zeros_like(present)
            present.view(-1)[0] = True
        x = organ_videos(batch["organs"], present, self.compute_dtype())
        mask = tube_mask(len(x), self.cfg.model, self.cfg.organs, self.cfg.mask_ratio, x.device)
        loss = self.mae(pixel_values=x, bool_masked_pos=mask).loss
        return {"loss": 0.0 * loss if empty else loss, "views": torch.tensor(0.0 if empty else float(len(x)))}

    @torch.no_grad()
    def embed(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each organ in the scan (`region`): the encoder's tokens mean-pooled, L2-normalised (the
        features stage 2 projects); the scan: their mean."""
        region = batch["region"].bool()
        x = organ_videos(batch["organs"], region, self.compute_dtype())
        tokens = self.mae.videomae(pixel_values=x).last_hidden_state
        v = at_slots(region, nn.functional.normalize(tokens.mean(1).float(), dim=-1))
        return anatomy_embeddings(v, region)

    def export_parts(self) -> dict[str, ExportPart]:
        return {"vision": ExportPart(self.mae.videomae)}

    def export_config(self) -> dict:
        return {
            **export_config(self.cfg.model, self.cfg.organs),
            "vision_part": "vision",
            "anatomies": list(self.cfg.organs.anatomies),
            "embedding": "VideoMAEModel last_hidden_state mean over tokens, per organ volume",
        }
