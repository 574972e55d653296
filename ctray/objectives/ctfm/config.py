"""CT-FM's recipe settings (defaults: the paper, except where a field says why it follows the released code)."""

from __future__ import annotations

from typing import Literal

from ctray.objectives.config import RecipeConfig


class CTFMConfig(RecipeConfig):
    """CT-FM intra-sample SimCLR."""

    name: Literal["ctfm_simclr"] = "ctfm_simclr"
    patches_per_scan: int = 15
    """M: patches sampled from each scan per step. CT-FM's released code (intrasample_simclr.yaml)
    uses 15; the paper says 20 of 24x128x128. The released numbers are used because the paper's
    patch size is not trainable as stated (see `patch_size`), so its patch count goes with it."""
    patch_size: tuple[int, int, int] = (32, 128, 128)
    """Patch size in voxels (z, y, x) at 3 x 1 x 1 mm. CT-FM's released code uses 32x128x128 (64 mm /
    3 mm = 21 slices, rounded up to a multiple of 16); the paper says 24x128x128 and "6.4 cm", but
    24 x 3 mm is not 6.4 cm and 24 does not divide by the SegResEncoder's 16x downsampling."""
    temperature: float = 0.1
    """NT-Xent temperature."""
    window_hu: tuple[float, float] = (-1024.0, 2048.0)
    """HU range mapped to 0..1 (clipped)."""
    crop_scale: tuple[float, float] = (0.33, 1.0)
    """Random resized crop: s ~ U(low, high), one per view, applied to every axis (MONAI RandScaleCrop
    as in CT-FM's RandomResizedCrop): the crop keeps ceil(s * size) voxels per axis, then is resized
    back to the patch size."""
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
