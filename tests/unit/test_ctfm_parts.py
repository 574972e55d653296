"""CT-FM's pieces against references: the loss against a naive per-scan loop, the batched
augmentations against MONAI's own transforms (as CT-FM's released intrasample_simclr.yaml uses them)
with the same random parameters, the patch sampler's bounds."""

import math

import numpy as np
import pytest
import torch
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import Flip, GaussianSmooth, RandHistogramShift, Resize, SpatialCrop

from ctray.objectives.ctfm.augment import (
    draw_gaussian_smooth,
    draw_histogram_shift,
    draw_resized_crop_flip,
    gaussian_kernels,
    gaussian_smooth,
    gaussian_smooth_with,
    histogram_shift,
    histogram_shift_with,
    resized_crop_flip,
    resized_crop_flip_with,
    window,
)
from ctray.objectives.ctfm.config import CTFMConfig
from ctray.objectives.ctfm.sampler import PatchSampler
from ctray.objectives.ctfm.task import CTFMTask
from ctray.objectives.losses import IntraSampleNTXent


def naive_intra_sample_ntxent(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Per scan, per anchor, straight from SimCLR's NT-Xent definition."""
    scans = []
    for s in range(z.shape[0]):
        views = [z[s, v, p] for v in range(2) for p in range(z.shape[2])]
        m = z.shape[2]
        terms = []
        for i, a in enumerate(views):
            pos = (i + m) % (2 * m)
            cos = [torch.nn.functional.cosine_similarity(a, b, dim=0) / tau for b in views]
            denom = sum(torch.exp(c) for k, c in enumerate(cos) if k != i)
            terms.append(-torch.log(torch.exp(cos[pos]) / denom))
        scans.append(sum(terms) / len(terms))
    return sum(scans) / len(scans)


def test_loss_matches_naive_loop_values_and_gradients():
    z = torch.randn(3, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    got = IntraSampleNTXent(0.1)(z)
    want = naive_intra_sample_ntxent(z_ref, 0.1)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    got.backward()
    want.backward()
    assert torch.allclose(z.grad, z_ref.grad, rtol=1e-4, atol=1e-6)


def test_no_cross_scan_negatives():
    """Changing another scan's features must not change a scan's own loss term."""
    loss = IntraSampleNTXent(0.1)
    z = torch.randn(2, 2, 4, 8)
    a = loss(z[:1])
    z2 = z.clone()
    z2[1] = torch.randn(2, 4, 8)
    assert torch.allclose(2 * loss(z) - loss(z[1:]), a, atol=1e-5) and torch.allclose(
        2 * loss(z2) - loss(z2[1:]), a, atol=1e-5
    )


def test_perfect_views_give_low_loss_and_bad_input_errors():
    feats = torch.nn.functional.one_hot(torch.arange(6), 6).float()
    z = feats.expand(2, 6, 6).unsqueeze(0)  # two identical views, orthogonal patches
    assert IntraSampleNTXent(0.1)(z) < 1e-3
    assert abs(IntraSampleNTXent(0.1)(torch.ones(1, 2, 6, 6)) - math.log(11)) < 1e-4  # collapsed: log(2M - 1)
    with pytest.raises(ValueError, match="at least 2 patches"):
        IntraSampleNTXent()(torch.randn(1, 2, 1, 4))
    with pytest.raises(ValueError, match="shape"):
        IntraSampleNTXent()(torch.randn(2, 3, 4))


def test_window():
    hu = torch.tensor([-2000, -1024, 512, 2048, 3000])
    assert torch.equal(window(hu, -1024, 2048), torch.tensor([0, 0, 0.5, 1, 1]))


def _monai_crop_resize_flip(img: torch.Tensor, start: list[int], size: list[int], flip: bool) -> torch.Tensor:
    out = SpatialCrop(roi_start=start, roi_end=[a + b for a, b in zip(start, size, strict=True)])(img)
    out = Resize(img.shape[1:], mode="trilinear")(out)
    return torch.as_tensor(Flip(spatial_axis=0)(out) if flip else out)


def test_resized_crop_flip_matches_monai():
    """Against MONAI SpatialCrop + Resize(trilinear) + Flip(0), i.e. what RandScaleCrop(roi_scale=s,
    random_size=False) + Resize + RandFlip do once their randomness is fixed."""
    rng = np.random.default_rng(0)
    dims = (12, 20, 16)
    x = torch.rand(8, 1, *dims, generator=torch.Generator().manual_seed(0))
    scales = [1.0, 0.33, 0.33, 0.5, 0.61, 0.77, 0.9, 0.999]
    sizes = [[math.ceil(s * n) for n in dims] for s in scales]
    starts = [[int(rng.integers(0, n - r + 1)) for n, r in zip(dims, size, strict=True)] for size in sizes]
    starts[2] = [n - r for n, r in zip(dims, sizes[2], strict=True)]  # the smallest crop at the far corner
    flips = [False, True, False, True, False, True, True, False]
    got = resized_crop_flip_with(x, torch.tensor(starts), torch.tensor(sizes), torch.tensor(flips))
    want = torch.stack([_monai_crop_resize_flip(x[i], starts[i], sizes[i], flips[i]) for i in range(8)])
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got[0], x[0])  # s = 1, no flip: the view itself


def test_crop_draw_is_one_scale_per_view_and_the_wrapper_applies_it():
    dims = (32, 128, 96)
    d = draw_resized_crop_flip(4000, dims, (0.33, 1.0), 0.5, gen=torch.Generator().manual_seed(0))
    assert d.scale.shape == (4000,) and ((d.scale >= 0.33) & (d.scale <= 1.0)).all()
    assert d.scale.min() < 0.34 and d.scale.max() > 0.99  # the whole range, not a volume fraction's cube root
    want_sizes = torch.tensor([[math.ceil(float(s) * n) for n in dims] for s in d.scale])
    assert torch.equal(d.sizes, want_sizes)  # ceil(s * size) on every axis, one s per view
    assert (d.starts >= 0).all() and (d.starts + d.sizes <= torch.tensor(dims)).all()
    assert (d.starts == torch.tensor(dims) - d.sizes).any(dim=0).all()  # the far corner is reachable
    assert 0.45 < d.flips.float().mean() < 0.55
    x = torch.rand(5, 1, 6, 10, 8)
    torch.manual_seed(3)
    got = resized_crop_flip(x, (0.33, 1.0), 0.5)
    torch.manual_seed(3)
    d = draw_resized_crop_flip(5, (6, 10, 8), (0.33, 1.0), 0.5)
    assert torch.equal(got, resized_crop_flip_with(x, d.starts, d.sizes, d.flips))
    assert torch.allclose(resized_crop_flip(x, (1.0, 1.0), 0.0), x) and torch.allclose(
        resized_crop_flip(x, (1.0, 1.0), 1.0), x.flip(2)
    )


def test_histogram_shift_matches_monai():
    gen = torch.Generator().manual_seed(1)
    for seed in range(6):
        t = RandHistogramShift(num_control_points=5, prob=1.0)
        t.set_random_state(seed)
        t.randomize(None)
        img = torch.rand(1, 7, 9, 11, generator=gen) * (1 + seed) - 0.4 * seed  # the view's own range, not 0..1
        ref = torch.as_tensor(t.reference_control_points, dtype=torch.float32)
        floating = torch.as_tensor(t.floating_control_points, dtype=torch.float32)
        got = histogram_shift_with(img[None], ref, floating[None])[0]
        want = torch.as_tensor(t(img, randomize=False))
        assert not torch.allclose(got, img) and torch.allclose(got, want, rtol=0, atol=1e-5)
    const = torch.full((2, 1, 3, 3, 3), 0.3)
    assert torch.equal(histogram_shift(const, 1.0, 5), const)  # MONAI returns a constant image unchanged


def test_histogram_shift_draws_and_wrapper():
    d = draw_histogram_shift(3000, 0.5, 5, gen=torch.Generator().manual_seed(0))
    f = d.floating
    assert torch.equal(d.reference, torch.linspace(0, 1, 5)) and (f[:, 1:] >= f[:, :-1]).all()
    assert (
        (f[:, 0] == 0).all()
        and (f[:, -1] == 1).all()
        and torch.equal(f[~d.drawn], d.reference.expand(len(f[~d.drawn]), 5))
    )
    assert 0.45 < d.drawn.float().mean() < 0.55
    x = torch.rand(6, 1, 4, 5, 6) * 7 - 2
    torch.manual_seed(5)
    got = histogram_shift(x, 0.5, 5)
    torch.manual_seed(5)
    d = draw_histogram_shift(6, 0.5, 5)
    assert torch.equal(got[~d.drawn], x[~d.drawn]) and d.drawn.any()
    assert torch.equal(got[d.drawn], histogram_shift_with(x[d.drawn], d.reference, d.floating[d.drawn]))
    assert torch.equal(histogram_shift(x, 0.0, 5), x)


@pytest.mark.parametrize("sigma", [(0.25, 0.3, 1.5), (1.5, 1.5, 1.5), (0.25, 0.25, 0.25), (0.3, 1.1, 0.7)])
def test_gaussian_smooth_matches_monai(sigma):
    """Against MONAI GaussianSmooth(approx="erf"); the batch's other view has other sigmas, so this
    view's kernels are zero-padded to the batch's longest (tail 6 at sigma 1.5: 13 taps, longer
    than the first axis)."""
    x = torch.rand(2, 1, 8, 15, 17, generator=torch.Generator().manual_seed(0)) * 3 - 1
    got = gaussian_smooth_with(x, torch.tensor([sigma, (1.5, 0.25, 1.0)]), 1.5)
    for i, s in enumerate((sigma, (1.5, 0.25, 1.0))):
        want = torch.as_tensor(GaussianSmooth(sigma=s, approx="erf")(x[i]))
        assert torch.allclose(got[i], want, rtol=0, atol=1e-5)


def test_gaussian_kernels_match_monai_and_wrapper():
    sigmas = torch.tensor([0.25, 0.3, 0.37, 0.62, 1.0, 1.37, 1.5])
    k = gaussian_kernels(sigmas, 1.5)
    assert k.shape == (7, 13)
    for row, s in zip(k, sigmas, strict=True):
        want = gaussian_1d(s, truncated=4.0, approx="erf")
        pad = (13 - len(want)) // 2
        assert torch.equal(row[pad : 13 - pad], want) and (row[:pad] == 0).all() and (row[13 - pad :] == 0).all()
    x = torch.rand(6, 1, 5, 6, 7)
    torch.manual_seed(2)
    got = gaussian_smooth(x, 0.5, (0.25, 1.5))
    torch.manual_seed(2)
    d = draw_gaussian_smooth(6, 0.5, (0.25, 1.5))
    assert ((d.sigmas >= 0.25) & (d.sigmas <= 1.5)).all() and d.drawn.any()
    assert torch.equal(got[~d.drawn], x[~d.drawn])
    assert torch.allclose(got[d.drawn], gaussian_smooth_with(x[d.drawn], d.sigmas[d.drawn], 1.5), atol=1e-6)
    assert torch.equal(gaussian_smooth(x, 0.0, (0.25, 1.5)), x)


def test_patch_sampler_bounds_and_padding():
    vol = np.arange(20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40)
    sampler = PatchSampler(6, (8, 16, 16))
    row = {"volume": [vol.tobytes()], "shape": [np.array(vol.shape)]}
    patches = sampler(row, np.random.default_rng(0))["patches"]
    assert patches.shape == (1, 6, 8, 16, 16) and patches.dtype == np.int16
    for p in patches[0]:  # each patch is a contiguous block of the volume
        z, y, x = np.unravel_index(int(p[0, 0, 0]), vol.shape)
        assert np.array_equal(p, vol[z : z + 8, y : y + 16, x : x + 16])
    small = PatchSampler(2, (8, 16, 16), pad=-1024).sample(np.zeros((4, 16, 16), np.int16), np.random.default_rng(0))
    assert (small[:, :2] == -1024).all() and (small[:, 2:6] == 0).all() and (small[:, 6:] == -1024).all()


def test_task_forward_backward_tiny():
    cfg = CTFMConfig(
        patches_per_scan=3, patch_size=(8, 32, 32), init_filters=4, blocks_down=(1, 1, 1), head_dims=(16, 8)
    )
    task = CTFMTask(cfg)
    out = task({"patches": torch.randint(-1000, 1500, (2, 3, 8, 32, 32), dtype=torch.int16)})
    assert set(out) == {"loss", "positive_cosine", "views"} and out["views"] == 12
    out["loss"].backward()
    assert all(p.grad is not None for p in task.encoder.parameters())


def test_sliding_patches_cover_the_scan_and_pad_like_training():
    from ctray.objectives.ctfm.sliding import SlidingPatches, tile_starts

    assert tile_starts(10, 4) == [0, 4, 6] and tile_starts(8, 4) == [0, 4] and tile_starts(4, 4) == [0]
    vol = np.arange(6 * 10 * 9, dtype=np.int16).reshape(6, 10, 9)
    out = SlidingPatches((8, 4, 4), pad=-1024)({"volume": [vol.tobytes()], "shape": [list(vol.shape)]}, None)
    patches, origins = out["patches"][0], out["patch_origin"][0]
    assert patches.shape == (3 * 3, 8, 4, 4) and origins.shape == (9, 3)
    for patch, (z, y, x) in zip(patches, origins, strict=True):  # naive: each patch is the scan at its origin
        assert z == -1 and np.all(patch[0] == -1024) and np.all(patch[7] == -1024)
        assert np.array_equal(patch[1:7], vol[:, y : y + 4, x : x + 4])
    covered = np.zeros(vol.shape[1:], dtype=bool)
    for _, y, x in origins:
        covered[y : y + 4, x : x + 4] = True
    assert covered.all()


# --- the augmentation as it was before it stopped asking the device for values -----------------
# A verbatim copy (but for names) of ctray/objectives/ctfm/augment.py's coin-flipped transforms at
# commit 04da4a0, which picked the drawn views with .nonzero() and sized the smoothing kernels with
# .item(): the reference the host-sync-free version must reproduce on the same seed.


def _old_on_drawn(x, drawn, fn):
    picked = drawn.nonzero().squeeze(1)
    if picked.numel() == 0:
        return x
    if picked.numel() == x.shape[0]:
        return fn(x, picked)
    return x.index_copy(0, picked, fn(x.index_select(0, picked), picked))


def _old_gaussian_kernels(sigmas):
    sigma = sigmas.float()
    tails = ((sigma.double() * 4.0).clamp(min=0.5) + 0.5).floor()
    t_max = int(tails.max().item())
    taps = torch.arange(-t_max, t_max + 1, dtype=torch.float32, device=sigma.device)
    t = (0.70710678 / sigma.abs())[:, None]
    k = (0.5 * ((t * (taps + 0.5)).erf() - (t * (taps - 0.5)).erf())).clamp(min=0)
    return torch.where(taps.abs().double() <= tails[:, None], k, 0.0)


def _old_gaussian_smooth_with(x, sigmas):
    n, c = x.shape[:2]
    groups = n * c
    out = x.reshape(1, groups, *x.shape[2:])
    for axis in range(3):
        k = _old_gaussian_kernels(sigmas[:, axis]).to(x.dtype).repeat_interleave(c, 0)
        shape = [groups, 1, 1, 1, 1]
        shape[2 + axis] = k.shape[1]
        pad = [0, 0, 0]
        pad[axis] = (k.shape[1] - 1) // 2
        out = torch.nn.functional.conv3d(out, k.view(shape), padding=pad, groups=groups)
    return out.reshape(x.shape)


def _old_views(cfg: CTFMConfig, patches: torch.Tensor) -> torch.Tensor:
    s, m = patches.shape[:2]
    x = window(patches, *cfg.window_hu).reshape(s * m, 1, *patches.shape[2:])
    x = torch.cat([x, x])
    x = resized_crop_flip(x, cfg.crop_scale, cfg.flip_prob)
    h = draw_histogram_shift(x.shape[0], cfg.histogram_shift_prob, cfg.histogram_control_points, x.device)
    x = _old_on_drawn(x, h.drawn, lambda v, idx: histogram_shift_with(v, h.reference, h.floating[idx]))
    g = draw_gaussian_smooth(x.shape[0], cfg.smooth_prob, cfg.smooth_sigma, x.device)
    x = _old_on_drawn(x, g.drawn, lambda v, idx: _old_gaussian_smooth_with(v, g.sigmas[idx]))
    return x.reshape(2, s, m, *x.shape[1:]).transpose(0, 1).reshape(s * 2 * m, *x.shape[1:])


@pytest.mark.parametrize("seed", range(4))
def test_views_equal_the_version_that_picked_the_drawn_views_on_the_host(seed):
    """Same seed, same views, to the bit: the random parameters are drawn as before (same calls,
    same order); a transform run on every view and kept where drawn gives the drawn views what
    picking them first gave; and the smoothing kernels, now as long as the config's largest sigma
    needs (13 taps at 1.5) where the old ones were as long as the batch's largest draw, add only
    zero taps, whose products are exact zeros."""
    cfg = CTFMConfig(patches_per_scan=5, patch_size=(8, 32, 32))
    task = CTFMTask(cfg)
    patches = torch.randint(
        -1024, 2048, (3, 5, 8, 32, 32), dtype=torch.int16, generator=torch.Generator().manual_seed(seed)
    )
    torch.manual_seed(seed)
    got = task.views(patches)
    torch.manual_seed(seed)
    want = _old_views(cfg, patches)
    assert got.shape == (30, 1, 8, 32, 32) and torch.equal(got, want)
