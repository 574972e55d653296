"""CA-GCL's settings (defaults: the paper, and fVLM's released code where the paper is silent)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ctray.anatomy import DEFAULT_FINDING_ANATOMIES
from ctray.objectives.contrast import ContrastConfig


class CAGCLConfig(ContrastConfig):
    """CA-GCL (defaults: the paper / fVLM)."""

    name: Literal["cagcl"] = "cagcl"
    anatomies: list[str] = Field(default_factory=lambda: list(DEFAULT_FINDING_ANATOMIES))
    """Anatomies (names of the ingest config's anatomy groups) with a query and a text each."""
    anatomy_labels: dict[str, list[int]] = Field(default_factory=dict)
    """Anatomy -> TotalSegmentator label ids; empty: read from the shards' manifest (the ingest
    config's anatomy groups)."""
    input_size: tuple[int, int, int] = (112, 256, 352)
    """The ViT input (z, y, x): a random crop of the scan at its ingest spacing, padded where the
    scan is smaller (fVLM: 112x256x352 at 3 x 1 x 1 mm, ctray's default ingest spacing)."""
    crop_margin: tuple[int, int, int] = (5, 20, 20)
    """Voxels kept around the anatomies' bounding box before the crop (fVLM: 5 slices, 20 in-plane)."""
    fit: Literal["crop", "resize"] = "crop"
    """crop: fVLM's random crop at the ingest spacing (physical scale kept); resize: the anatomies'
    region resampled to input_size (for tiny local models on whole-body phantoms)."""
    flip_prob: float = 0.2
    """Probability of flipping the scan along each axis, independently (fVLM: 0.2)."""
    min_voxels: int = 1
    """An anatomy counts for a scan (N_j of eq. 1, the paper's "complete anatomical structures")
    only with at least this many voxels in the crop (fVLM: any voxel) and as `presence` says."""
    presence: Literal["crop_faces", "in_scan"] = "crop_faces"
    """Which anatomies in a crop are complete. crop_faces (fVLM's code, its model's forward):
    none of its voxels on the crop's faces; where the crop is padded beyond the scan, the padding
    lies between the organ and the face, so an organ running past the field of view (esophagus and
    aorta past a chest scan, bone always) still counts. in_scan: also refuse an anatomy whose
    stored box touches the scan's border (stricter; on chest CT it leaves little but lung and heart)."""
    crop_anatomies: list[str] | None = None
    """The anatomies whose bounding box (plus crop_margin) the crop is cut around; None: all of
    `anatomies`. Bone spans the scan, so a box around it is the scan: the paper job cuts around
    the chest organs."""
    patch: tuple[int, int, int] = (16, 16, 32)
    """ViT patch (z, y, x) (fVLM: 16x16x32 -> 7x16x11 = 1232 tokens)."""
    window_hu: tuple[float, float] = (-1150.0, 350.0)
    """HU range mapped to 0..1 (fVLM: -1150..350)."""
    width: int = 768
    """ViT width (ViT-B: 768)."""
    depth: int = 12
    """ViT blocks (ViT-B: 12)."""
    heads: int = 12
    """ViT attention heads (ViT-B: 12)."""
    pool_heads: int = 4
    """Heads of the shared anatomy query attention (fVLM: 4)."""
    pool_blocks: tuple[int, ...] | None = None
    """The ViT blocks, counted from 1, whose tokens the anatomy pooling reads: each anatomy's query
    attends to its tokens of all of them at once (one key/value sequence). Increasing, ending with
    the last block (`depth`), which is read after the final norm, the others as their block
    outputs them. None: the last block only. fVLM: [4, 7, 10, 12] (its vit.py keeps the outputs
    of the 0-based blocks 3, 6, 9 and the normed last one). The default keeps the pooling that
    exports written before this field hold."""
    vit_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout in the ViT: after the position embedding, on the attention weights, after the
    attention's output projection, after the MLP's GELU and after its output (fVLM: 0.1, its MONAI
    ViT's places). 0: none, as exports written before this field."""
    pool_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the anatomy query attention's weights (fVLM: 0.1)."""
    vit_init: str | None = None
    """A 2D ViT whose blocks, final norm and position embedding the 3D ViT starts from (fVLM: MAE's
    ImageNet ViT-B, `mae_pretrain_vit_base.pth`): a transformers ViTMAEModel/ViTModel folder
    (config.json + weights, loaded with from_pretrained), a timm-named state dict (.safetensors,
    .pth or .bin; MAE's {"model": ...} accepted) or a folder holding one, or a Hugging Face Hub id
    of either (downloaded where the Hub is reachable). The driver checks it before the workers
    start and every worker loads it: a local path must exist on every node. `objective.width`,
    `depth`, `heads` and the MLP must match it; the 2D position grid is resized to the in-plane
    token grid and repeated over depth (fVLM's way; ctray.objectives.cagcl.vit_init). None: random
    init. An export holds the trained weights: `load_encoder` never reads this."""
    vit_init_patch_embed: Literal["scratch", "inflate"] = "scratch"
    """The 3D patch embedding with `vit_init`: scratch (random init, trained; fVLM) or inflate (the
    2D kernel summed over RGB, resized in-plane and spread over the patch's slices, I3D-style)."""
    global_weight: float = 0.1
    """lambda of eq. (5); 0 trains the local loss only (the paper's fine-grained VLP baseline)."""
    text_augmentation: bool = True
    """Clinical-aware text augmentation (Sec. 2.3); off: all sentences in report order."""

    @model_validator(mode="after")
    def _crop_anatomies_known(self) -> CAGCLConfig:
        unknown = sorted(set(self.crop_anatomies or []) - set(self.anatomies))
        if unknown:
            raise ValueError(f"crop_anatomies {unknown} are not among anatomies {self.anatomies}")
        return self

    @model_validator(mode="after")
    def _patches_tile(self) -> CAGCLConfig:
        if any(s % p for s, p in zip(self.input_size, self.patch, strict=False)):
            raise ValueError(f"input_size {list(self.input_size)} is not a multiple of the patch {list(self.patch)}")
        return self

    @model_validator(mode="after")
    def _pool_blocks_exist(self) -> CAGCLConfig:
        blocks = list(self.pool_blocks or [self.depth])
        if blocks != sorted(set(blocks)) or blocks[0] < 1 or blocks[-1] != self.depth:
            raise ValueError(
                f"pool_blocks {blocks}: increasing block numbers 1..{self.depth}, ending with the last ({self.depth})"
            )
        return self
