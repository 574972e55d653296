"""TotalFM's settings: how organ volumes are cut (shared by both stages, which must agree), the
VideoMAE size, and each stage's config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ctray.anatomy import DEFAULT_FINDING_ANATOMIES
from ctray.config import Section
from ctray.objectives.config import RecipeConfig
from ctray.objectives.contrast import ContrastConfig


class OrganInput(Section):
    """How organ volumes are cut from a scan (must match between the two stages)."""

    anatomies: list[str] = Field(default_factory=lambda: list(DEFAULT_FINDING_ANATOMIES))
    """Organs (anatomy names of the ingest config) to cut out."""
    size: tuple[int, int, int] = (16, 160, 160)
    """Frames x height x width of every organ volume (frames: axial slices)."""
    margin_mm: float = 10.0
    """Margin around the organ's bounding box, on every side."""
    window_hu: tuple[float, float] = (-1000.0, 1000.0)
    """HU range mapped to 0..1 (a wide window: lung nodules and soft-tissue lesions both stay visible)."""
    cache: bool = True
    """Cut the organ volumes once, into the shard set's _organs/ folder (organ_cache: the run's
    driver needs write access to the shard set), and train from them; false: cut them from the
    scan at every draw (the same values, ~4x the data feed's CPU)."""


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

    def check_fits(self, organs: OrganInput) -> None:
        """Organ volumes must tile into tubelets x patches (checked when the config loads)."""
        t, h, w = organs.size
        if h != w or h % self.patch_size or t % self.tubelet_size:
            raise ValueError(
                f"organ size {list(organs.size)}: needs H == W, a multiple of patch {self.patch_size}, "
                f"and frames a multiple of tubelet {self.tubelet_size}"
            )

    def videomae_config(self, organs: OrganInput) -> Any:
        """The transformers VideoMAEConfig of this size for these organ volumes."""
        from transformers import VideoMAEConfig

        t, h, _ = organs.size
        return VideoMAEConfig(
            image_size=h,
            num_frames=t,
            num_channels=1,
            patch_size=self.patch_size,
            tubelet_size=self.tubelet_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate_size,
            decoder_hidden_size=self.decoder_hidden_size,
            decoder_num_hidden_layers=self.decoder_layers,
            decoder_num_attention_heads=self.decoder_heads,
            decoder_intermediate_size=self.decoder_intermediate_size,
            norm_pix_loss=True,
            use_mean_pooling=True,
        )


class TotalFMMAEConfig(RecipeConfig):
    """TotalFM stage 1: organ-separated VideoMAE."""

    name: Literal["totalfm_mae"] = "totalfm_mae"
    organs: OrganInput = Field(default_factory=OrganInput)
    model: VideoMAESize = Field(default_factory=VideoMAESize)
    mask_ratio: float = 0.9
    """Fraction of each organ volume's spatial patches masked (the same ones in every frame pair)."""

    @model_validator(mode="after")
    def _organs_fit(self) -> TotalFMMAEConfig:
        self.model.check_fits(self.organs)
        return self

    def counted_anatomies(self) -> list[str]:
        """One organ volume per organ with a stored box (OrganSampler), and a VideoMAE batch counts
        volumes."""
        return list(self.organs.anatomies)


class TotalFMCLIPConfig(ContrastConfig):
    """TotalFM stage 2: organ-wise volume-text contrastive learning."""

    name: Literal["totalfm_clip"] = "totalfm_clip"
    organs: OrganInput = Field(default_factory=OrganInput)
    model: VideoMAESize = Field(default_factory=VideoMAESize)
    init_from: str | None = None
    """Stage-1 run folder (or its export/ folder). None trains the vision encoder from
    random init, which defeats stage 1: a warning says so."""

    @model_validator(mode="after")
    def _organs_fit(self) -> TotalFMCLIPConfig:
        self.model.check_fits(self.organs)
        return self


def export_config(model: VideoMAESize, organs: OrganInput) -> dict[str, Any]:
    """The VideoMAE encoder's export description (both stages: stage 2 checks its stage-1 run against it)."""
    return {
        "architecture": "transformers.VideoMAEModel",
        "config": model.videomae_config(organs).to_dict(),
        "organs": organs.model_dump(mode="json"),
        "input": "organ volume (frames = axial slices), 1 channel, window_hu -> [0, 1], shape (N, T, 1, H, W)",
    }
