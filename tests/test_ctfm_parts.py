"""CT-FM's pieces against references: the loss against a naive per-scan loop, the batched
augmentations' properties, the patch sampler's bounds."""

import math

import numpy as np
import pytest
import torch

from ctray.data.samplers import PatchSampler
from ctray.objectives.augment import gaussian_smooth, histogram_shift, resized_crop_flip, window
from ctray.objectives.ctfm import CTFMConfig, CTFMTask
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
    assert torch.allclose(2 * loss(z) - loss(z[1:]), a, atol=1e-5) and torch.allclose(2 * loss(z2) - loss(z2[1:]), a, atol=1e-5)


def test_perfect_views_give_low_loss_and_bad_input_errors():
    feats = torch.nn.functional.one_hot(torch.arange(6), 6).float()
    z = feats.expand(2, 6, 6).unsqueeze(0)  # two identical views, orthogonal patches
    assert IntraSampleNTXent(0.1)(z) < 1e-3
    assert abs(IntraSampleNTXent(0.1)(torch.ones(1, 2, 6, 6)) - math.log(11)) < 1e-4  # collapsed: log(2M - 1)
    with pytest.raises(ValueError, match="at least 2 patches"):
        IntraSampleNTXent()(torch.randn(1, 2, 1, 4))
    with pytest.raises(ValueError, match="shape"):
        IntraSampleNTXent()(torch.randn(2, 3, 4))


def test_augmentations_are_identity_at_zero_probability_and_full_scale():
    x = torch.rand(3, 1, 8, 12, 10)
    assert torch.allclose(resized_crop_flip(x, (1.0, 1.0), 0.0), x, atol=1e-5)
    flipped = resized_crop_flip(x, (1.0, 1.0), 1.0)
    assert torch.allclose(flipped, x.flip(2), atol=1e-5)
    assert torch.equal(histogram_shift(x, 0.0, 5), x) or torch.allclose(histogram_shift(x, 0.0, 5), x, atol=1e-6)
    assert torch.allclose(gaussian_smooth(x, 0.0, (0.25, 1.5)), x, atol=1e-6)


def test_augmentation_properties():
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 1000).reshape(1, 1, 10, 10, 10).repeat(4, 1, 1, 1, 1)
    shifted = histogram_shift(ramp, 1.0, 5, gen)
    flat = shifted.reshape(4, -1)
    assert (flat[:, 1:] >= flat[:, :-1] - 1e-6).all()  # a monotone intensity map
    assert torch.allclose(flat[:, 0], torch.zeros(4)) and torch.allclose(flat[:, -1], torch.ones(4))
    assert not torch.allclose(shifted, ramp)
    const = torch.full((2, 1, 6, 6, 6), 0.3)
    assert torch.allclose(gaussian_smooth(const, 1.0, (0.5, 1.5), gen), const, atol=1e-6)
    spike = torch.zeros(2, 1, 15, 15, 15)
    spike[:, :, 7, 7, 7] = 1
    blurred = gaussian_smooth(spike, 1.0, (1.0, 1.5), gen)
    assert blurred[:, :, 7, 7, 7].max() < 0.2 and torch.allclose(blurred.sum(), spike.sum(), rtol=1e-4)
    crop = resized_crop_flip(ramp, (0.33, 0.34), 0.0, gen)
    assert crop.shape == ramp.shape and (crop.amax((1, 2, 3, 4)) - crop.amin((1, 2, 3, 4)) < 0.9).all()  # zoomed in
    assert torch.equal(window(torch.tensor([-2000, -1024, 512, 2048, 3000]), -1024, 2048), torch.tensor([0, 0, 0.5, 1, 1]))


def test_patch_sampler_bounds_and_padding():
    vol = np.arange(20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40)
    sampler = PatchSampler(6, (8, 16, 16), seed=0)
    row = {"volume": [vol.tobytes()], "shape": [np.array(vol.shape)]}
    patches = sampler(row)["patches"]
    assert patches.shape == (1, 6, 8, 16, 16) and patches.dtype == np.int16
    for p in patches[0]:  # each patch is a contiguous block of the volume
        z, y, x = np.unravel_index(int(p[0, 0, 0]), vol.shape)
        assert np.array_equal(p, vol[z : z + 8, y : y + 16, x : x + 16])
    small = PatchSampler(2, (8, 16, 16), pad=-1024, seed=0).sample(np.zeros((4, 16, 16), np.int16), np.random.default_rng(0))
    assert (small[:, :2] == -1024).all() and (small[:, 2:6] == 0).all() and (small[:, 6:] == -1024).all()


def test_task_forward_backward_tiny():
    cfg = CTFMConfig(patches_per_scan=3, patch_size=(8, 32, 32), init_filters=4, blocks_down=(1, 1, 1), head_dims=(16, 8))
    task = CTFMTask(cfg)
    out = task({"patches": torch.randint(-1000, 1500, (2, 3, 8, 32, 32), dtype=torch.int16)})
    assert set(out) == {"loss", "positive_cosine", "views"} and out["views"] == 12
    out["loss"].backward()
    assert all(p.grad is not None for p in task.encoder.parameters())
