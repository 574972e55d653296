"""CT-FM's view augmentations, batched in torch so they run on the training device.

CT-FM's own loader applies MONAI transforms one patch at a time on CPU workers (280 ms of one
core per view, DESIGN.md section 6). Here every transform draws its random parameters per
sample and applies them to the whole batch at once; the probabilities and ranges are MONAI's:

- random resized crop (scale 0.33..1 of the patch volume, resized back by trilinear
  interpolation) and flip of axis 0 (z), p=0.5: one `affine_grid` + `grid_sample` call;
- histogram shift (MONAI RandHistogramShift, 5 control points), p=0.5: a per-sample piecewise
  linear intensity map; MONAI takes the control points' range from each image's min and max,
  here the window's fixed 0..1 range (images are windowed first), so a batch shares the knots;
- Gaussian smoothing (MONAI RandGaussianSmooth, sigma 0.25..1.5 per axis), p=0.5: separable
  per-sample kernels as one grouped convolution per axis over the drawn samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window(hu: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """HU -> [0, 1] with clipping (CT-FM: ScaleIntensityRange(-1024, 2048, 0, 1, clip=True))."""
    return ((hu.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)


def resized_crop_flip(x: torch.Tensor, scale: tuple[float, float], flip_prob: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """x: (N, 1, D, H, W). Each sample: a random sub-box holding `scale` of the volume (same
    fraction per axis), resized to (D, H, W); z flipped with probability `flip_prob`."""
    n = x.shape[0]
    dev = x.device
    vol_frac = torch.empty(n, device=dev).uniform_(scale[0], scale[1], generator=gen)
    side = vol_frac.pow(1.0 / 3.0)  # fraction of each axis
    theta = torch.zeros(n, 3, 4, device=dev)
    for axis in range(3):  # theta rows act on (x=W, y=H, z=D)
        theta[:, axis, axis] = side
        theta[:, axis, 3] = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * (1 - side)
    flip = torch.rand(n, device=dev, generator=gen) < flip_prob
    theta[:, 2, 2] = torch.where(flip, -theta[:, 2, 2], theta[:, 2, 2])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def histogram_shift(x: torch.Tensor, prob: float, control_points: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """x in [0, 1], (N, 1, D, H, W). Knots at linspace(0, 1, K); for drawn samples each inner knot
    moves to uniform(moved previous knot, next knot) in turn, as MONAI's RandHistogramShift, which
    keeps the map monotone."""
    n, k = x.shape[0], control_points
    dev = x.device
    ref = torch.linspace(0, 1, k, device=dev)
    floating = ref.expand(n, k).clone()
    for i in range(1, k - 1):
        lo, hi = floating[:, i - 1], floating[:, i + 1]
        floating[:, i] = lo + torch.rand(n, device=dev, generator=gen) * (hi - lo)
    drawn = (torch.rand(n, device=dev, generator=gen) < prob)[:, None]
    floating = torch.where(drawn, floating, ref.expand(n, k))  # (N, K)
    # The piecewise linear map as a sum of clamped ramps, one per segment: no gathers.
    step = 1.0 / (k - 1)
    slopes = (floating[:, 1:] - floating[:, :-1]) / step  # (N, K - 1)
    shape = (n,) + (1,) * (x.ndim - 1)
    out = torch.zeros_like(x)
    for i in range(k - 1):
        out += slopes[:, i].reshape(shape).to(x.dtype) * (x - i * step).clamp(0.0, step)
    return out


def gaussian_smooth(x: torch.Tensor, prob: float, sigma: tuple[float, float], gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample, per-axis sigma in `sigma`, for the samples drawn with probability `prob`."""
    n = x.shape[0]
    dev = x.device
    drawn = torch.rand(n, device=dev, generator=gen) < prob
    sigmas = torch.empty(n, 3, device=dev).uniform_(sigma[0], sigma[1], generator=gen)
    picked = drawn.nonzero().squeeze(1)
    if picked.numel() == 0:
        return x
    radius = max(1, math.ceil(3 * sigma[1]))
    taps = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
    m = picked.numel()
    out = x[picked].reshape(1, m, *x.shape[2:])  # samples as channels: one grouped conv per axis
    for axis in range(3):
        kernel = torch.exp(-0.5 * (taps[None, :] / sigmas[picked, axis, None]) ** 2)
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)
        shape = [m, 1, 1, 1, 1]
        shape[2 + axis] = kernel.shape[1]
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape), groups=m)
    result = x.clone()
    result[picked] = out.reshape(m, *x.shape[1:])
    return result
