"""TotalFM (organ-separated CT foundation model; abstract public, recipe in DESIGN.md section 4).

Stage 1 `totalfm_mae`: VideoMAE self-supervised pretraining on organ volumes (each organ's box plus
a margin, resampled to T x H x W; the axial slices are the frames), with transformers'
VideoMAEForPreTraining: 1 channel, tubelet 2, patch 16, tube masking at ratio ~0.9 and the
normalised-pixel MSE.
Stage 2 `totalfm_clip`: the stage-1 encoder (mean-pooled tokens -> LayerNorm -> projection) against
one finding sentence of the organ per step, through a BERT-style encoder: organ-wise CLIP InfoNCE
in both directions with a learnable temperature, negatives = the same organ across the global batch.

Where the abstract is silent we follow VideoMAE's public code (tube masking shares one spatial mask
over all frames; mean pooling as in VideoMAEForVideoClassification) and CLIP / open_clip (the loss
is (CE(image->text) + CE(text->image)) / 2, here averaged over the organs that have pairs).
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ctray.config import Section, StorageConfig
from ctray.data.phantoms import FINDINGS
from ctray.data.samplers import OrganSampler
from ctray.objectives.anatomy_text import AnatomyTextTask, ContrastConfig, anatomy_texts, at_slots, synthetic_text_fields, text_assets

log = logging.getLogger(__name__)


class OrganInput(Section):
    """How organ volumes are cut from a scan (must match between the two stages)."""

    anatomies: list[str] = Field(default_factory=lambda: sorted(set(FINDINGS.values())))
    """Organs (anatomy names of the ingest config) to cut out."""
    size: tuple[int, int, int] = (16, 160, 160)
    """Frames x height x width of every organ volume (frames: axial slices)."""
    margin_mm: float = 10.0
    """Margin around the organ's bounding box, on every side."""
    window_hu: tuple[float, float] = (-1000.0, 1000.0)
    """HU range mapped to 0..1 (a wide window: lung nodules and soft-tissue lesions both stay visible)."""


class VideoMAESize(Section):
    """transformers VideoMAEConfig fields (defaults: ViT-B encoder, VideoMAE's small decoder)."""

    patch_size: int = 16
    """Spatial patch (pixels, square)."""
    tubelet_size: int = 2
    """Frames per token (tubelet)."""
    hidden_size: int = 768
    """Encoder width (ViT-B: 768)."""
    layers: int = 12
    """Encoder blocks (ViT-B: 12)."""
    heads: int = 12
    """Encoder attention heads (ViT-B: 12)."""
    intermediate_size: int = 3072
    """Encoder MLP width."""
    decoder_hidden_size: int = 384
    """Decoder width (VideoMAE: 384); stage 1 only."""
    decoder_layers: int = 4
    """Decoder blocks (VideoMAE: 4)."""
    decoder_heads: int = 6
    """Decoder attention heads (VideoMAE: 6)."""
    decoder_intermediate_size: int = 1536
    """Decoder MLP width."""

    def videomae_config(self, organs: OrganInput):
        from transformers import VideoMAEConfig

        t, h, w = organs.size
        if h != w or h % self.patch_size or t % self.tubelet_size:
            raise ValueError(f"organ size {list(organs.size)}: needs H == W, a multiple of patch {self.patch_size}, and frames a multiple of tubelet {self.tubelet_size}")
        return VideoMAEConfig(
            image_size=h, num_frames=t, num_channels=1, patch_size=self.patch_size, tubelet_size=self.tubelet_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.layers, num_attention_heads=self.heads,
            intermediate_size=self.intermediate_size, decoder_hidden_size=self.decoder_hidden_size,
            decoder_num_hidden_layers=self.decoder_layers, decoder_num_attention_heads=self.decoder_heads,
            decoder_intermediate_size=self.decoder_intermediate_size, norm_pix_loss=True, use_mean_pooling=True,
        )


class TotalFMMAEConfig(Section):
    """TotalFM stage 1: organ-separated VideoMAE."""

    name: Literal["totalfm_mae"] = "totalfm_mae"
    organs: OrganInput = Field(default_factory=OrganInput)
    model: VideoMAESize = Field(default_factory=VideoMAESize)
    mask_ratio: float = 0.9
    """Fraction of each organ volume's spatial patches masked (the same ones in every frame pair)."""


class TotalFMCLIPConfig(ContrastConfig):
    """TotalFM stage 2: organ-wise volume-text contrastive learning."""

    name: Literal["totalfm_clip"] = "totalfm_clip"
    organs: OrganInput = Field(default_factory=OrganInput)
    model: VideoMAESize = Field(default_factory=VideoMAESize)
    init_from: str | None = None
    """Stage-1 run folder (or its export/encoder.safetensors). None trains the vision encoder from
    random init, which defeats stage 1: a warning says so."""


def organ_sampler(cfg: TotalFMMAEConfig | TotalFMCLIPConfig, assets: dict, seed: int | None = None) -> OrganSampler:
    o = cfg.organs
    texts = anatomy_texts(cfg, o.anatomies, assets, "one") if isinstance(cfg, TotalFMCLIPConfig) else None
    return OrganSampler(o.anatomies, tuple(o.size), o.margin_mm, tuple(o.window_hu), texts, seed)


def synthetic_batch(cfg, scans: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = len(cfg.organs.anatomies)
    batch = {
        "organs": torch.rand((scans, a, *cfg.organs.size), generator=gen).half(),
        "present": torch.ones((scans, a), dtype=torch.uint8), "region": torch.ones((scans, a), dtype=torch.uint8),
    }
    if isinstance(cfg, TotalFMCLIPConfig):
        batch.update(synthetic_text_fields(cfg, scans, a, gen))
    return {k: v.to(device) for k, v in batch.items()}


def tube_mask(n: int, cfg: VideoMAESize, organs: OrganInput, ratio: float, device) -> torch.Tensor:
    """(n, tokens) bool, True = masked: the same random spatial patches in every tubelet (VideoMAE's
    tube masking), exactly round(ratio * patches) per volume (at most all but one) so the batch stays rectangular."""
    t, h, _ = organs.size
    spatial = (h // cfg.patch_size) ** 2
    masked = min(spatial - 1, int(round(ratio * spatial)))  # at least one visible patch
    order = torch.rand(n, spatial, device=device).argsort(1)
    mask = torch.zeros(n, spatial, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :masked], True)
    return mask.repeat(1, t // cfg.tubelet_size)


def _videos(organs: torch.Tensor, present: torch.Tensor, dtype) -> torch.Tensor:
    """(S, A, T, H, W) + present (S, A) -> (N, T, 1, H, W): the present organ volumes as 1-channel videos."""
    return organs[present.bool()].unsqueeze(2).to(dtype)


class TotalFMMAETask(nn.Module):
    """Batch {"organs": (S, A, T, H, W) float16 in [0, 1], "present": (S, A)} -> VideoMAE loss."""

    def __init__(self, cfg: TotalFMMAEConfig, assets: dict | None = None):
        super().__init__()
        from transformers import VideoMAEForPreTraining

        self.cfg = cfg
        self.mae = VideoMAEForPreTraining(cfg.model.videomae_config(cfg.organs))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        param = next(self.parameters())
        x = _videos(batch["organs"], batch["present"], param.dtype)
        mask = tube_mask(len(x), self.cfg.model, self.cfg.organs, self.cfg.mask_ratio, x.device)
        loss = self.mae(pixel_values=x, bool_masked_pos=mask).loss
        return {"loss": loss, "views": torch.tensor(float(len(x)))}

    def export_module(self) -> nn.Module:
        return self.mae.videomae

    def export_config(self) -> dict:
        return _export_config(self.cfg)


def _export_config(cfg) -> dict:
    return {
        "architecture": "transformers.VideoMAEModel",
        "config": cfg.model.videomae_config(cfg.organs).to_dict(),
        "organs": cfg.organs.model_dump(mode="json"),
        "input": "organ volume (frames = axial slices), 1 channel, window_hu -> [0, 1], shape (N, T, 1, H, W)",
    }


def stage1_export(init_from: str) -> str:
    """A stage-1 run folder or its encoder.safetensors -> the safetensors URI."""
    if init_from.endswith(".safetensors"):
        return init_from
    return init_from.rstrip("/") + "/export/encoder.safetensors"


def check_stage1(cfg: TotalFMCLIPConfig, storage: StorageConfig) -> str | None:
    """Driver-side check of the hand-off: the stage-1 export exists and was cut and built like this
    stage's organs and model. Returns the resolved URI (None: random init, with a loud warning)."""
    from ctray.storage import filesystem, read_bytes, resolve_uri

    if cfg.init_from is None:
        log.warning("=" * 70 + "\ntotalfm_clip: objective.init_from is not set, so the vision encoder starts from RANDOM "
                    "INIT instead of the stage-1 VideoMAE encoder. Set it to the totalfm_mae run folder.\n" + "=" * 70)
        return None
    uri = resolve_uri(stage1_export(cfg.init_from))
    fs, path = filesystem(uri, storage)
    try:
        meta = json.loads(read_bytes(fs, path[: -len(".safetensors")] + ".json", storage))
    except FileNotFoundError:
        raise ValueError(f"objective.init_from: no stage-1 export at {uri} (run totalfm_mae to the end first)") from None
    ours = json.loads(json.dumps(_export_config(cfg)))
    if meta.get("organs") != ours["organs"]:
        raise ValueError(f"objective.init_from: {uri} was trained with different organs than this stage (objective.organs must match)")
    theirs, mine = _encoder_fields(meta.get("config", {})), _encoder_fields(ours["config"])
    if theirs != mine:
        diff = sorted(k for k in theirs.keys() | mine.keys() if theirs.get(k) != mine.get(k))
        raise ValueError(f"objective.init_from: {uri} has a different encoder than objective.model ({', '.join(diff)})")
    return uri


def _encoder_fields(config: dict) -> dict:
    """The VideoMAE config fields that shape the encoder's weights (the decoder and versions may differ)."""
    return {k: config.get(k) for k in _ENCODER_FIELDS}


_ENCODER_FIELDS = ("image_size", "num_frames", "num_channels", "patch_size", "tubelet_size", "hidden_size",
                   "num_hidden_layers", "num_attention_heads", "intermediate_size", "qv_bias", "use_mean_pooling")


def clip_assets(cfg) -> dict:
    return {**text_assets(cfg), "init_from": check_stage1(cfg.objective, cfg.storage), "storage": cfg.storage.model_dump(mode="json")}


class TotalFMCLIPTask(AnatomyTextTask):
    """Organ volumes + one sentence per organ -> organ-wise CLIP loss (see module docstring)."""

    def __init__(self, cfg: TotalFMCLIPConfig, assets: dict):
        super().__init__(cfg, assets)
        from transformers import VideoMAEModel

        self.cfg = cfg
        self.anatomies = list(cfg.organs.anatomies)
        self.vision = VideoMAEModel(cfg.model.videomae_config(cfg.organs))
        if assets.get("init_from"):
            self._load_stage1(assets["init_from"], StorageConfig.model_validate(assets["storage"]))
        self.vision_norm = nn.LayerNorm(cfg.model.hidden_size)
        self.vision_proj = nn.Linear(cfg.model.hidden_size, cfg.embed_dim)

    def _load_stage1(self, uri: str, storage: StorageConfig) -> None:
        from safetensors.torch import load

        from ctray.storage import filesystem, read_bytes

        fs, path = filesystem(uri, storage)
        state = load(read_bytes(fs, path, storage))
        self.vision.load_state_dict(state, strict=True)
        log.info("totalfm_clip: vision encoder loaded from stage 1 (%s, %d tensors)", uri, len(state))

    def embed_volumes(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, 1, H, W) -> (N, embed_dim) L2-normalised."""
        tokens = self.vision(pixel_values=x).last_hidden_state
        return F.normalize(self.vision_proj(self.vision_norm(tokens.mean(1))).float(), dim=-1)

    def embed_organs(self, organs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(S, A, T, H, W) organ volumes -> (S, A, embed_dim), only the `mask` slots encoded."""
        mask = mask.bool()
        return at_slots(mask, self.embed_volumes(_videos(organs, mask, next(self.parameters()).dtype)))

    def embed_anatomies(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.embed_organs(batch["organs"], batch["region"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        present = batch["present"].bool()
        g = self.gathered(self.embed_organs(batch["organs"], present), self.embed_reports(batch), batch)
        scale = self.temperature()
        per_organ = self.local_losses(g, scale)
        organs_with_pairs = (g["present"].bool().sum(0) >= 2).sum().clamp(min=1)
        loss = per_organ.sum() / (2 * organs_with_pairs)
        return {"loss": loss, "temperature": 1 / scale.detach(), "views": torch.tensor(float(present.sum()))}

    def export_module(self) -> nn.Module:
        return self

    def export_config(self) -> dict:
        return {**_export_config(self.cfg), "architecture": "ctray.objectives.totalfm.TotalFMCLIPTask (vision + text towers)",
                "embed_dim": self.cfg.embed_dim, "text": self.cfg.text.model_dump(mode="json")}

