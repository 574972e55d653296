"""TotalFM stage 1 on the device: tube masking and transformers' VideoMAEForPreTraining (1 channel,
tubelet 2, patch 16, normalised-pixel MSE) over the batch's organ volumes.

The step asks the device for no value: the present organs' slots come from the host batch
(`host_fields`), the masked and visible tokens are index lists of a size fixed by the mask ratio
(`tube_masking`), and the pretraining loss selects tokens with those indices (`videomae_loss`)
where transformers' forward uses boolean masks, whose every use waits for the device to count them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ctray.objectives.slots import anatomy_embeddings, at_slots, slots_of
from ctray.objectives.spec import Assets, Batch, ExportPart, Task
from ctray.objectives.totalfm.config import OrganInput, TotalFMMAEConfig, VideoMAESize, export_config

if TYPE_CHECKING:
    from transformers import VideoMAEForPreTraining


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


def position_tables_as_buffers(model: nn.Module) -> nn.Module:
    """transformers' VideoMAE keeps its fixed sin-cos position tables as plain tensor attributes,
    which `.to(device)` leaves on the CPU, so every forward copies them to the GPU and waits for the
    copy. Re-registered as non-persistent buffers they move with the model and stay out of its state
    dict (checkpoints and exports are unchanged). Returns `model`."""
    for module in model.modules():
        table = module.__dict__.get("position_embeddings")
        if isinstance(table, torch.Tensor):
            del module.position_embeddings
            module.register_buffer("position_embeddings", table, persistent=False)
    return model


class TubeMask(NamedTuple):
    """VideoMAE tube masking of N volumes as token indices, each row ascending (the order boolean
    masking keeps)."""

    visible: torch.Tensor
    """(N, tubelets x visible patches) int64: the tokens the encoder sees."""
    masked: torch.Tensor
    """(N, tubelets x masked patches) int64: the tokens the decoder reconstructs."""

    def as_bool(self, tokens: int) -> torch.Tensor:
        """(N, tokens) bool, True = masked: transformers' `bool_masked_pos`."""
        mask = torch.zeros(self.masked.shape[0], tokens, dtype=torch.bool, device=self.masked.device)
        return mask.scatter_(1, self.masked, True)


def tube_masking(n: int, cfg: VideoMAESize, organs: OrganInput, ratio: float, device: torch.device) -> TubeMask:
    """The same random spatial patches masked in every tubelet (VideoMAE's tube masking), exactly
    round(ratio * patches) per volume (at most all but one) so the batch stays rectangular; tokens
    are numbered tubelet-major, as VideoMAE's patch embedding flattens them."""
    t, h, _ = organs.size
    spatial = (h // cfg.patch_size) ** 2
    masked = min(spatial - 1, round(ratio * spatial))  # at least one visible patch
    order = torch.rand(n, spatial, device=device).argsort(1)
    first = torch.arange(t // cfg.tubelet_size, device=device)[:, None] * spatial  # each tubelet's first token

    def tubes(patches: torch.Tensor) -> torch.Tensor:  # (n, k) patch numbers -> (n, tubelets * k) tokens
        return (first + patches.sort(1).values[:, None, :]).flatten(1)

    return TubeMask(visible=tubes(order[:, masked:]), masked=tubes(order[:, :masked]))


def _take(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens (N, L, C), idx (N, K) -> (N, K, C): tokens[n, idx[n]]."""
    return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))


def videomae_loss(mae: VideoMAEForPreTraining, x: torch.Tensor, mask: TubeMask) -> torch.Tensor:
    """`mae(pixel_values=x, bool_masked_pos=mask.as_bool(...)).loss` with every token selection a
    gather by `mask`'s indices instead of a boolean index (4 per step in transformers 5's
    VideoMAEForPreTraining.forward, each a device-to-host sync): the same modules, inputs and
    arithmetic in the same order, for the 1-channel, normalised-pixel config TotalFM builds
    (VideoMAESize.videomae_config). x: (N, T, 1, H, W)."""
    model = mae.videomae
    tokens = model.embeddings.patch_embeddings(x)
    position = model.embeddings.position_embeddings.detach().type_as(tokens).to(device=tokens.device, copy=True)
    hidden = model.encoder(_take(tokens + position, mask.visible)).last_hidden_state
    if model.layernorm is not None:
        hidden = model.layernorm(hidden)
    hidden = mae.encoder_to_decoder(hidden)
    position = mae.position_embeddings.expand(len(x), -1, -1).type_as(x).detach().to(device=x.device, copy=True)
    full = torch.cat([hidden + _take(position, mask.visible), mae.mask_token + _take(position, mask.masked)], dim=1)
    logits = mae.decoder(full, mask.masked.shape[1]).logits
    with torch.no_grad():
        labels = _take(_normalised_patches(x, mae.config.tubelet_size, mae.config.patch_size), mask.masked)
    return F.mse_loss(logits, labels)


def _normalised_patches(x: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """(N, T, C, H, W) -> (N, tokens, tubelet * patch * patch * C): each token's pixels, normalised
    by their own mean and (unbiased) std (VideoMAE's norm_pix_loss targets)."""
    n, t, c, h, w = x.shape
    frames = x.view(n, t // tubelet, tubelet, c, h // patch, patch, w // patch, patch)
    frames = frames.permute(0, 1, 4, 6, 2, 5, 7, 3).contiguous()
    frames = frames.view(n, t // tubelet * h // patch * w // patch, tubelet * patch * patch, c)
    std = frames.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    normed = (frames - frames.mean(dim=-2, keepdim=True)) / (std + 1e-6)
    return normed.view(n, normed.shape[1], tubelet * patch * patch * c)


def organ_videos(organs: torch.Tensor, present: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(S, A, T, H, W) + present (S, A) -> (N, T, 1, H, W): the present organ volumes as 1-channel videos."""
    return organs[present.bool()].unsqueeze(2).to(dtype)


class TotalFMMAETask(Task):
    """Batch {"organs": (S, A, T, H, W) float16 in [0, 1], "present": (S, A)} -> VideoMAE loss."""

    def __init__(self, cfg: TotalFMMAEConfig, assets: Assets | None = None):
        super().__init__()
        from transformers import VideoMAEForPreTraining

        self.cfg = cfg
        self.mae = position_tables_as_buffers(VideoMAEForPreTraining(cfg.model.videomae_config(cfg.organs)))

    def host_fields(self, batch: Batch) -> Batch:
        """The present organs' slots (`slots_of`) as "present_slots": the number of volumes is then a shape."""
        return {"present_slots": slots_of(batch["present"].bool())}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        slots = batch["present_slots"] if "present_slots" in batch else slots_of(batch["present"].bool())
        # A batch without an organ still runs the model, on its first slot weighted 0: every rank
        # then reduces every gradient (DeepSpeed), or the ranks that have organs would wait for it.
        empty = len(slots) == 0
        if empty:
            slots = slots.new_zeros(1)
        x = batch["organs"].flatten(0, 1).index_select(0, slots).unsqueeze(2).to(self.compute_dtype())
        mask = tube_masking(len(x), self.cfg.model, self.cfg.organs, self.cfg.mask_ratio, x.device)
        loss = videomae_loss(self.mae, x, mask)
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
