"""CT-FM's view augmentations, batched in torch so they run on the training device.

CT-FM's own loader (project-lighter/CT-FM, experiments/fm/frameworks/intrasample_simclr.yaml, MONAI
1.4.1rc1) applies MONAI transforms one patch at a time on CPU workers (280 ms of one core per view,
`ctray bench data`). Here each transform draws its random parameters for every view at once (torch's
global generator on the batch's device, or `gen`) and applies them to the whole batch; each result
equals MONAI's on that view with the same parameters, to float rounding:

- random resized crop (CT-FM's `RandomResizedCrop(size, scale=[0.33, 1.0])`: MONAI
  RandScaleCrop(roi_scale=s, random_size=False, random_center=True) with one s ~ U(0.33, 1) per
  view, then Resize(size, mode="trilinear")) and RandFlip(spatial_axis=0, prob=0.5):
  `draw_resized_crop_flip` + `resized_crop_flip_with`;
- RandHistogramShift(num_control_points=5, prob=0.5): `draw_histogram_shift` + `histogram_shift_with`;
- RandGaussianSmooth(sigma 0.25..1.5 per axis, approx="erf", prob=0.5): `draw_gaussian_smooth` +
  `gaussian_smooth_with`.

Views are (N, C, D, H, W) tensors; axis 0 of the parameters below is D (MONAI's first spatial axis).

No transform asks the device for a value (no `.item()`, `.nonzero()`, boolean indexing): every
shape is known on the host, so the training step never waits for the GPU and can be captured or
compiled whole. The coin-flipped transforms therefore run on every view and keep the result only
where the coin says so (`_on_drawn`), and the smoothing kernels have the length of the largest
sigma the config allows, not of the largest drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def window(hu: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """HU -> [0, 1] with clipping (CT-FM: ScaleIntensityRange(-1024, 2048, 0, 1, clip=True))."""
    return ((hu.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _on_drawn(x: torch.Tensor, drawn: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn(x) where `drawn` (N,), x unchanged elsewhere. fn runs on every view (fn acts on each view
    alone, so a drawn view's result is the same as on the drawn views only): picking the drawn views
    first would need their count on the host, a wait for the device every step. At p = 0.5 that is
    twice the work of the picked views, which for these transforms is small against the encoder's."""
    return torch.where(drawn.view(-1, *([1] * (x.ndim - 1))), fn(x), x)


# --- random resized crop + flip ---------------------------------------------------------------


class CropDraw(NamedTuple):
    """Per-view parameters of `resized_crop_flip_with`, N views."""

    scale: torch.Tensor
    """(N,) float64: s ~ U(low, high), the fraction kept of every axis (volume s^3)."""
    starts: torch.Tensor
    """(N, 3) int64: the crop's first voxel per axis (D, H, W)."""
    sizes: torch.Tensor
    """(N, 3) int64: the crop's size per axis, ceil(s * size)."""
    flips: torch.Tensor
    """(N,) bool: flip axis 0 (D) after the resize."""


def draw_resized_crop_flip(
    n: int,
    size: tuple[int, int, int],
    scale: tuple[float, float],
    flip_prob: float,
    device: torch.device | str = "cpu",
    gen: torch.Generator | None = None,
) -> CropDraw:
    """MONAI RandScaleCrop(roi_scale=s, random_size=False, random_center=True) per view: roi =
    ceil(s * size) per axis (math.ceil in MONAI's get_max_roi_size, here in float64 too), corner
    uniform in 0..size - roi (get_random_patch's randint(0, size - roi + 1)); then RandFlip's coin."""
    s = torch.empty(n, dtype=torch.float64, device=device).uniform_(scale[0], scale[1], generator=gen)
    # Per axis with the size as a Python number: a tensor made from `size` on a GPU would be a
    # blocking host-to-device copy. Capped at the patch as MONAI's get_valid_patch_size does, should
    # a config allow s > 1.
    sizes = torch.stack([torch.ceil(s * d).clamp(max=d) for d in size], 1).long()
    room = torch.stack([d - sizes[:, i] + 1 for i, d in enumerate(size)], 1).double()
    u = torch.rand(n, 3, dtype=torch.float64, device=device, generator=gen)
    starts = (u * room).floor().long()
    flips = torch.rand(n, device=device, generator=gen) < flip_prob
    return CropDraw(s, starts, sizes, flips)


def _axis_taps(
    start: torch.Tensor, length: torch.Tensor, out: int, flips: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-interpolation taps of F.interpolate(align_corners=False) from a crop of `length` voxels
    at `start` to `out` voxels, per view: src = start + clamp((i + 0.5) * length / out - 0.5, 0,
    length - 1), in float32 as ATen's area_pixel_compute_source_index. start, length: (N,).
    Returns the lower and upper source indices (N, out) int64 and the upper weight (N, out) float32."""
    dst = torch.arange(out, device=start.device, dtype=torch.float32)
    last = (length - 1).float()[:, None]
    scale = (length.float() / out)[:, None]
    src = torch.minimum((scale * (dst + 0.5) - 0.5).clamp_(min=0.0), last)
    lo = src.floor()
    weight = src - lo
    hi = torch.minimum(lo + 1, last)
    i0, i1 = lo.long() + start[:, None], hi.long() + start[:, None]
    if flips is not None:  # reading the taps backwards is the flip of the resized view
        f = flips[:, None]
        i0, i1, weight = (torch.where(f, t.flip(1), t) for t in (i0, i1, weight))
    return i0, i1, weight


def _lerp_along(x: torch.Tensor, dim: int, i0: torch.Tensor, i1: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[..., j, ...] = lerp(x[..., i0[n, j], ...], x[..., i1[n, j], ...], w[n, j]) along `dim`."""
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = i0.shape[1]
    full = list(x.shape)
    full[dim] = i0.shape[1]
    lo = x.gather(dim, i0.view(shape).expand(full))
    return lo.lerp_(x.gather(dim, i1.view(shape).expand(full)), w.view(shape).to(x.dtype))


def resized_crop_flip_with(
    x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, flips: torch.Tensor | None = None
) -> torch.Tensor:
    """x: (N, C, D, H, W); starts, sizes: (N, 3) int64 crop boxes; flips: (N,) bool or None.
    -> (N, C, D, H, W): each view's box x[n, :, s0:s0+l0, s1:s1+l1, s2:s2+l2] resized back to
    (D, H, W) as MONAI Resize(mode="trilinear") (F.interpolate, align_corners=False, no
    anti-aliasing), then flipped along D where `flips`. Trilinear interpolation is separable, so
    one gather + lerp per axis; each pass holds ~3 copies of the batch."""
    starts, sizes = starts.to(x.device), sizes.to(x.device)
    out = x
    for axis in (2, 1, 0):
        taps = _axis_taps(starts[:, axis], sizes[:, axis], x.shape[2 + axis], flips if axis == 0 else None)
        out = _lerp_along(out, 2 + axis, *taps)
    return out


def resized_crop_flip(
    x: torch.Tensor, scale: tuple[float, float], flip_prob: float, gen: torch.Generator | None = None
) -> torch.Tensor:
    """x: (N, C, D, H, W) -> same shape: CT-FM's RandomResizedCrop + RandFlip(spatial_axis=0)."""
    d = draw_resized_crop_flip(x.shape[0], (x.shape[2], x.shape[3], x.shape[4]), scale, flip_prob, x.device, gen)
    return resized_crop_flip_with(x, d.starts, d.sizes, d.flips)


# --- histogram shift ---------------------------------------------------------------------------


class HistogramDraw(NamedTuple):
    """Per-view parameters of `histogram_shift_with`, N views, K control points."""

    drawn: torch.Tensor
    """(N,) bool: the views the shift applies to (probability `prob`)."""
    reference: torch.Tensor
    """(K,) float32: linspace(0, 1, K)."""
    floating: torch.Tensor
    """(N, K) float32: the moved control points (equal to `reference` where not drawn)."""


def draw_histogram_shift(
    n: int, prob: float, control_points: int, device: torch.device | str = "cpu", gen: torch.Generator | None = None
) -> HistogramDraw:
    """MONAI RandHistogramShift.randomize per view: floating = reference, then for i in 1..K-2
    floating[i] = uniform(floating[i - 1], floating[i + 1]) in turn (monotone; ends fixed)."""
    ref = torch.linspace(0, 1, control_points, device=device)
    floating = ref.expand(n, control_points).clone()
    for i in range(1, control_points - 1):
        lo, hi = floating[:, i - 1], floating[:, i + 1]
        floating[:, i] = lo + torch.rand(n, device=device, generator=gen) * (hi - lo)
    drawn = torch.rand(n, device=device, generator=gen) < prob
    floating = torch.where(drawn[:, None], floating, ref.expand(n, control_points))
    return HistogramDraw(drawn, ref, floating)


def histogram_shift_with(x: torch.Tensor, reference: torch.Tensor, floating: torch.Tensor) -> torch.Tensor:
    """x: (N, ...); reference: (K,) or (N, K); floating: (N, K), both in 0..1. -> x's shape.
    MONAI RandHistogramShift.__call__ per view: both point sets scaled to the view's own
    [min, max], then its piecewise linear interp (slope m and intercept b per segment, segment j
    for xp[j] < v <= xp[j + 1], as searchsorted - 1 clipped to the segments). A constant view
    is returned unchanged."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    lo, hi = flat.amin(1)[:, None], flat.amax(1)[:, None]
    span = hi - lo
    xp = reference.to(x).expand(floating.shape) * span + lo
    fp = floating.to(x) * span + lo
    flat_view = span == 0  # MONAI skips these; slope 1, intercept 0 keeps them exact
    slope = torch.where(flat_view, 1.0, (fp[:, 1:] - fp[:, :-1]) / (xp[:, 1:] - xp[:, :-1]))
    icpt = torch.where(flat_view, 0.0, fp[:, :-1] - slope * xp[:, :-1])
    shape = (n,) + (1,) * (x.ndim - 1)
    out = slope[:, 0].view(shape) * x + icpt[:, 0].view(shape)
    for j in range(1, slope.shape[1]):
        seg = slope[:, j].view(shape) * x + icpt[:, j].view(shape)
        out = torch.where(x > xp[:, j].view(shape), seg, out)
    return out


def histogram_shift(
    x: torch.Tensor, prob: float, control_points: int, gen: torch.Generator | None = None
) -> torch.Tensor:
    """x: (N, ...) -> same shape: MONAI RandHistogramShift(num_control_points, prob) per view."""
    d = draw_histogram_shift(x.shape[0], prob, control_points, x.device, gen)
    return _on_drawn(x, d.drawn, lambda v: histogram_shift_with(v, d.reference, d.floating))


# --- Gaussian smoothing ------------------------------------------------------------------------


class SmoothDraw(NamedTuple):
    """Per-view parameters of `gaussian_smooth_with`, N views."""

    drawn: torch.Tensor
    """(N,) bool: the views smoothed (probability `prob`)."""
    sigmas: torch.Tensor
    """(N, 3) float32: sigma per axis (D, H, W) in voxels, each ~ U(low, high)."""


def draw_gaussian_smooth(
    n: int,
    prob: float,
    sigma: tuple[float, float],
    device: torch.device | str = "cpu",
    gen: torch.Generator | None = None,
) -> SmoothDraw:
    """MONAI RandGaussianSmooth(sigma_x=sigma_y=sigma_z=sigma, prob) per view: three independent
    uniform sigmas."""
    drawn = torch.rand(n, device=device, generator=gen) < prob
    sigmas = torch.empty(n, 3, device=device).uniform_(sigma[0], sigma[1], generator=gen)
    return SmoothDraw(drawn, sigmas)


def gaussian_tail(sigma: float) -> int:
    """Taps on each side of the centre of MONAI's gaussian_1d(sigma, truncated=4.0)."""
    return int(max(4.0 * sigma, 0.5) + 0.5)


def gaussian_kernels(sigmas: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """sigmas: (N,), each <= max_sigma -> (N, 2T + 1) float32: MONAI gaussian_1d(sigma,
    truncated=4.0, approx="erf") per view (tail = int(max(4 sigma, 0.5) + 0.5), taps 0.5 (erf(t (x
    + 0.5)) - erf(t (x - 0.5))) with t = 0.70710678 / sigma, clamped at 0, not renormalised),
    centred and zero-padded to the tail T of `max_sigma` (a length known on the host, whatever was
    drawn). Zero taps at both ends under zero padding equal MONAI's shorter kernel."""
    sigma = sigmas.float()
    tails = ((sigma.double() * 4.0).clamp(min=0.5) + 0.5).floor()
    t_max = gaussian_tail(max_sigma)
    taps = torch.arange(-t_max, t_max + 1, dtype=torch.float32, device=sigma.device)
    t = (0.70710678 / sigma.abs())[:, None]
    k = (0.5 * ((t * (taps + 0.5)).erf() - (t * (taps - 0.5)).erf())).clamp(min=0)
    return torch.where(taps.abs().double() <= tails[:, None], k, 0.0)


def gaussian_smooth_with(x: torch.Tensor, sigmas: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """x: (N, C, D, H, W); sigmas: (N, 3) per-view sigma per axis, each <= max_sigma. -> x's shape:
    MONAI GaussianSmooth(sigma, approx="erf") per view (separable_filtering with zero padding), as
    one grouped convolution per axis with the views' channels as groups (kernels of max_sigma's
    length: `gaussian_kernels`)."""
    n, c = x.shape[:2]
    groups = n * c
    out = x.reshape(1, groups, *x.shape[2:])
    for axis in range(3):
        k = gaussian_kernels(sigmas[:, axis], max_sigma).to(x.dtype).repeat_interleave(c, 0)
        shape = [groups, 1, 1, 1, 1]
        shape[2 + axis] = k.shape[1]
        pad = [0, 0, 0]
        pad[axis] = (k.shape[1] - 1) // 2
        out = F.conv3d(out, k.view(shape), padding=pad, groups=groups)
    return out.reshape(x.shape)


def gaussian_smooth(
    x: torch.Tensor, prob: float, sigma: tuple[float, float], gen: torch.Generator | None = None
) -> torch.Tensor:
    """x: (N, C, D, H, W) -> same shape: MONAI RandGaussianSmooth(prob, sigma_{x,y,z}=sigma, approx="erf")."""
    d = draw_gaussian_smooth(x.shape[0], prob, sigma, x.device, gen)
    return _on_drawn(x, d.drawn, lambda v: gaussian_smooth_with(v, d.sigmas, sigma[1]))
