"""TotalFM / CA-GCL pieces against references: eq. (1)-(4) against naive loops (values and
gradients), the permutation's use of each anatomy token, soft targets, the learnable temperature,
the clinical-aware augmentation, the anatomy pooling's masking, the samplers against direct
computations, and AUROC against pair counting."""

import itertools
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctray.data.samplers import AnatomyTexts, window01
from ctray.data.text import TextEncoding, clinical_aware, train_wordpiece
from ctray.evaluate.zeroshot import auroc, classification_metrics, logit_margins
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.objectives.cagcl.sampler import AnatomyScanSampler
from ctray.objectives.cagcl.task import anatomy_lut, device_batch
from ctray.objectives.cagcl.vit import AnatomyQueryPooling, ViT3D
from ctray.objectives.losses import (
    AnatomyLocalLoss,
    CrossAnatomyGlobalLoss,
    LearnableTemperature,
    bidirectional_infonce,
    false_negative_targets,
)
from ctray.objectives.totalfm.config import OrganInput
from ctray.objectives.totalfm.sampler import OrganSampler


def cos(a, b):
    return F.cosine_similarity(a, b, dim=0)


def dot(a, b):
    return (a * b).sum()


def naive_local(v, r, present, tau):
    """Eq. (1) term by term, summed over anatomies (eq. 5's first part). V and R are unit vectors,
    so the cosine of the equation is their dot product (cosine_similarity would also project the
    gradient onto the sphere, which the module leaves to the normalisation that produced V, R)."""
    total = 0.0
    for j in range(v.shape[1]):
        idx = [i for i in range(v.shape[0]) if present[i, j]]
        if len(idx) < 2:
            continue
        acc = 0.0
        for i in idx:
            num = torch.exp(dot(v[i, j], r[i, j]) / tau)
            acc = acc + torch.log(num / sum(torch.exp(dot(v[i, j], r[k, j]) / tau) for k in idx))
            acc = acc + torch.log(num / sum(torch.exp(dot(v[k, j], r[i, j]) / tau) for k in idx))
        total = total - acc / len(idx)
    return total


def naive_global(v, r, present, tau, perm):
    """Eq. (2)-(4): group k = (V_{pi_j(k), j})_j averaged over the anatomies it holds."""
    b, a = present.shape
    groups_v, groups_r = [], []
    for k in range(b):
        parts = [(v[perm[j][k], j], r[perm[j][k], j]) for j in range(a) if present[perm[j][k], j]]
        if parts:
            groups_v.append(sum(p[0] for p in parts) / len(parts))
            groups_r.append(sum(p[1] for p in parts) / len(parts))
    acc = 0.0
    for i in range(len(groups_v)):
        num = torch.exp(cos(groups_v[i], groups_r[i]) / tau)
        acc = acc + torch.log(num / sum(torch.exp(cos(groups_v[i], gr) / tau) for gr in groups_r))
        acc = acc + torch.log(num / sum(torch.exp(cos(gv, groups_r[i]) / tau) for gv in groups_v))
    return -acc / len(groups_v)


def embeddings(b=6, a=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, a, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    r = F.normalize(torch.randn(b, a, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    present = torch.rand(b, a, generator=g) < 0.75
    present[:, 0] = True
    return v, r, present


def test_local_loss_matches_eq1_values_and_gradients():
    v, r, present = embeddings()
    tau = 0.07
    got = AnatomyLocalLoss()(v, r, present, torch.tensor(1 / tau, dtype=torch.float64)).sum()
    v2, r2 = v.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
    want = naive_local(v2, r2, present, tau)
    assert torch.allclose(got.double(), want, rtol=1e-6)
    got.backward()
    want.backward()
    assert torch.allclose(v.grad, v2.grad, atol=1e-8) and torch.allclose(r.grad, r2.grad, atol=1e-8)


def test_local_loss_uses_only_same_anatomy_negatives():
    v, r, present = embeddings()
    loss = AnatomyLocalLoss()
    scale = torch.tensor(10.0, dtype=torch.float64)
    base = loss(v, r, present, scale)
    v2 = v.detach().clone()
    v2[:, 1] = F.normalize(torch.randn_like(v2[:, 1]), dim=-1)  # change anatomy 1 only
    changed = loss(v2, r, present, scale)
    assert not torch.allclose(base[1], changed[1])
    keep = [0, 2, 3]
    assert torch.allclose(base[keep], changed[keep])


def test_global_loss_matches_eq2_4_and_uses_each_token_once():
    v, r, present = embeddings(b=7, a=5)
    tau = 0.1
    g = torch.Generator().manual_seed(3)
    perm = CrossAnatomyGlobalLoss.permutations(7, 5, torch.Generator().manual_seed(3), "cpu")
    # each anatomy token (sample i, anatomy j) lands in exactly one group
    assert all(sorted(row.tolist()) == list(range(7)) for row in perm)
    got = CrossAnatomyGlobalLoss()(v, r, present, torch.tensor(1 / tau, dtype=torch.float64), g)
    v2, r2 = v.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
    want = naive_global(v2, r2, present, tau, perm.tolist())
    assert torch.allclose(got.double(), want, rtol=1e-6)
    got.backward()
    want.backward()
    assert torch.allclose(v.grad, v2.grad, atol=1e-8) and torch.allclose(r.grad, r2.grad, atol=1e-8)


def test_global_loss_with_every_anatomy_present_is_eq3_mean():
    v, r, _ = embeddings(b=5, a=3)
    present = torch.ones(5, 3, dtype=torch.bool)
    perm = CrossAnatomyGlobalLoss.permutations(5, 3, torch.Generator().manual_seed(1), "cpu")
    vt = torch.stack([sum(v[perm[j, k], j] for j in range(3)) / 3 for k in range(5)])
    rt = torch.stack([sum(r[perm[j, k], j] for j in range(3)) / 3 for k in range(5)])
    logits = 10 * F.normalize(vt, dim=-1) @ F.normalize(rt, dim=-1).T
    want = F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    got = CrossAnatomyGlobalLoss()(
        v, r, present, torch.tensor(10.0, dtype=torch.float64), torch.Generator().manual_seed(1)
    )
    assert torch.allclose(got.double(), want.double(), rtol=1e-6)


def test_soft_targets_make_identical_texts_positives():
    hashes = torch.tensor([1, 1, 2, 3])
    abnormal = torch.tensor([1, 1, 0, 0])
    t = false_negative_targets(hashes, abnormal)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.allclose(t[0], torch.tensor([0.5, 0.5, 0, 0])) and torch.allclose(t[2], torch.tensor([0, 0, 0.5, 0.5]))
    # against the loop form of soft-target InfoNCE: -sum_k t_ik log p_ik, both directions
    v, r, _ = embeddings(b=5, a=1)
    present = torch.ones(5, 1, dtype=torch.bool)
    h, ab = torch.tensor([[7], [7], [8], [9], [10]]), torch.tensor([[1], [1], [0], [0], [1]])
    got = AnatomyLocalLoss(True)(v, r, present, torch.tensor(10.0, dtype=torch.float64), h, ab)[0]
    same = [[h[i, 0] == h[k, 0] or (ab[i, 0] == 0 and ab[k, 0] == 0) or i == k for k in range(5)] for i in range(5)]
    want = 0.0
    for i in range(5):
        row = torch.stack([10 * dot(v[i, 0], r[k, 0]) for k in range(5)]).log_softmax(0)
        col = torch.stack([10 * dot(v[k, 0], r[i, 0]) for k in range(5)]).log_softmax(0)
        w = torch.tensor(same[i], dtype=torch.float64) / sum(same[i])
        want = want - (w * row).sum() / 5 - (w * col).sum() / 5
    assert torch.allclose(got.double(), want, rtol=1e-6)
    assert not torch.allclose(
        got.double(), AnatomyLocalLoss(False)(v, r, present, torch.tensor(10.0, dtype=torch.float64))[0].double()
    )


def _local_by_subsets(v, r, present, scale, text_hash=None, abnormal=None):
    """The per-anatomy loop AnatomyLocalLoss ran before it was masked: each anatomy's present rows
    picked out (a nonzero per anatomy, a host read each on a GPU) and bidirectional_infonce on them."""
    losses = []
    for j in range(v.shape[1]):
        idx = present[:, j].nonzero().squeeze(1)
        if len(idx) < 2:
            losses.append(0.0 * v[:, j].sum())
            continue
        targets = None if text_hash is None else false_negative_targets(text_hash[idx, j], abnormal[idx, j])
        losses.append(bidirectional_infonce(v[idx, j], r[idx, j], scale, targets))
    return torch.stack(losses)


@pytest.mark.parametrize("soft", [False, True])
def test_masked_local_loss_equals_the_loop_over_present_subsets_with_none_one_and_all_present(soft):
    v, r, _ = embeddings(b=6, a=5, seed=4)
    present = torch.zeros(6, 5, dtype=torch.bool)
    present[:, 0] = True  # all
    present[2, 1] = True  # one: no negatives
    present[[0, 3, 5], 3] = True  # some; anatomy 2 none, anatomy 4 two
    present[[1, 4], 4] = True
    g = torch.Generator().manual_seed(5)
    hashes = torch.randint(0, 3, (6, 5), generator=g)
    abnormal = torch.randint(-1, 2, (6, 5), generator=g, dtype=torch.int8)
    extra = (hashes, abnormal) if soft else ()
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    got = AnatomyLocalLoss(soft)(v, r, present, scale, *extra)
    v2, r2 = v.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
    want = _local_by_subsets(v2, r2, present, scale, *extra)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got, want)
    assert got[1] == 0 and got[2] == 0 and (got[[0, 3, 4]] > 0).all()
    (got * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()  # each anatomy's gradient weighed apart
    (want * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    assert torch.allclose(v.grad, v2.grad, atol=1e-10) and torch.allclose(r.grad, r2.grad, atol=1e-10)
    assert torch.isfinite(v.grad).all() and not v.grad[:, [1, 2]].any()


def test_global_loss_with_fewer_than_two_groups_is_zero_with_zero_gradient():
    v, r, _ = embeddings(b=4, a=3, seed=6)
    present = torch.zeros(4, 3, dtype=torch.bool)
    present[1, 2] = True  # one token: one group has an anatomy, the other three none
    got = CrossAnatomyGlobalLoss()(v, r, present, torch.tensor(10.0, dtype=torch.float64), torch.Generator())
    got.backward()
    assert got == 0 and torch.isfinite(v.grad).all() and not v.grad.any()


def test_learnable_temperature_is_clamped_after_the_step_not_in_forward():
    """fVLM / open_clip: the parameter is clamped in place after the optimizer step, so at a bound
    its gradient still flows (a clamp inside forward would zero it and stall the temperature)."""
    from ctray.train.optim import clamp_

    t = LearnableTemperature(0.07, 0.001, 0.5)
    assert abs(1 / t().item() - 0.07) < 1e-6
    with torch.no_grad():
        t.tau.fill_(0.0005)  # below the lower bound, as one optimizer step could leave it
    t().backward()
    assert t.tau.grad is not None and t.tau.grad.abs().item() > 0
    clamp_(t.tau, *t.bounds, zero_stage=0)
    assert abs(1 / t().item() - 0.001) < 1e-6
    with torch.no_grad():
        t.tau.fill_(0.9)
    clamp_(t.tau, *t.bounds, zero_stage=0)
    assert abs(1 / t().item() - 0.5) < 1e-6
    with pytest.raises(ValueError, match="outside"):
        LearnableTemperature(0.9)


def test_clinical_aware_augmentation_properties():
    sentences = [f"Sentence {i}." for i in range(5)]
    rng = np.random.default_rng(0)
    draws = [clinical_aware(sentences, rng) for _ in range(400)]
    parts = [d.split(" ", 1) and [s + "." for s in d.rstrip(".").split(". ")] for d in draws]
    assert all(p and set(p) <= set(sentences) and len(p) == len(set(p)) for p in parts)  # non-empty subsets, no repeats
    assert {len(p) for p in parts} == {1, 2, 3, 4, 5}  # partial completeness: every size occurs
    orders = {tuple(p) for p in parts if len(p) == 5}
    assert len(orders) > 1  # permutation: full reports come in several orders
    assert all(any(s in p for p in parts) for s in sentences)
    assert clinical_aware(["Only one."], rng) == "Only one."
    with pytest.raises(ValueError):
        clinical_aware([], rng)


def test_anatomy_pooling_attends_only_to_its_tokens():
    torch.manual_seed(0)
    pool = AnatomyQueryPooling(anatomies=3, dim=16, heads=4, out_dim=8).eval()
    tokens = torch.randn(2, 10, 16)
    mask = torch.zeros(2, 3, 10, dtype=torch.bool)
    mask[:, 0, :4] = True
    mask[:, 1, 4:7] = True  # anatomy 2 has no token: attends to all, output ignored by `present`
    out = pool(tokens, mask)
    assert out.shape == (2, 3, 8) and torch.allclose(out.norm(dim=-1), torch.ones(2, 3))
    t2 = tokens.clone()
    t2[:, 7:] = torch.randn(2, 3, 16)  # tokens no anatomy 0/1 selects
    out2 = pool(t2, mask)
    assert torch.allclose(out[:, :2], out2[:, :2], atol=1e-6) and not torch.allclose(out[:, 2], out2[:, 2])


def test_vit_token_grid():
    vit = ViT3D((8, 32, 48), (4, 16, 16), dim=24, depth=1, heads=2)
    assert vit(torch.randn(2, 1, 8, 32, 48)).shape == (2, 2 * 2 * 3, 24) and vit.grid == (2, 2, 3)


def _row(vol, labels, boxes, texts, labels_kv):
    return {
        "volume": [vol.tobytes()],
        "shape": [list(vol.shape)],
        "spacing": [[2.0, 2.0, 2.0]],
        "label_map": [labels.tobytes()],
        "anatomy_boxes": [boxes],
        "anatomy_texts": [texts],
        "labels": [labels_kv],
    }


def test_samplers_against_direct_computation():
    vol = np.full((12, 32, 32), -1000, dtype=np.int16)
    labels = np.zeros(vol.shape, dtype=np.uint8)
    vol[2:6, 4:12, 20:28] = 200
    labels[2:6, 4:12, 20:28] = 5  # liver
    tok = TextEncoding(train_wordpiece([["The liver is normal."], ["A lesion in the liver."]], 60, min_patients=1), 16)
    texts = AnatomyTexts(["liver", "lung"], {"liver_lesion": "liver", "lung_nodule": "lung"}, tok, "one")
    row = _row(
        vol,
        labels,
        [{"anatomy": "liver", "box": [2, 4, 20, 6, 12, 28], "voxels": 256}],
        [{"anatomy": "liver", "sentences": ["A lesion in the liver."]}],
        [{"name": "liver_lesion", "value": 1}],
    )

    organs = OrganInput(anatomies=["liver", "lung"], size=(4, 8, 8), margin_mm=0.0, window_hu=(-1000.0, 1000.0))
    organ = OrganSampler(organs, texts)(row, np.random.default_rng(0))
    assert organ["organs"].shape == (1, 2, 4, 8, 8)
    assert np.allclose(organ["organs"][0, 0], 0.6, atol=1e-3)  # the box holds only 200 HU -> (200 + 1000) / 2000
    assert organ["present"].tolist() == [[1, 0]] and organ["region"].tolist() == [[1, 0]]
    assert organ["abnormal"].tolist() == [[1, -1]] and organ["finding_labels"].tolist() == [[1, -1]]
    assert organ["text_mask"][0, 0].sum() > 2 and organ["text_mask"][0, 1].sum() == 0

    ids = {"liver": [5], "lung": [10, 11]}
    window = (-1000.0, 1000.0)

    def sampler(size: tuple[int, int, int], evaluation: bool = False, **settings: Any) -> OnDevice:
        cfg = CAGCLConfig(anatomies=["liver", "lung"], input_size=size, patch=(4, 8, 8), window_hu=window, **settings)
        return OnDevice(cfg, ids, texts, evaluation)

    scan = sampler((12, 32, 32), flip_prob=0.0)(row, np.random.default_rng(0))
    # fVLM's cut: the liver's box + (5, 20, 20) voxels is z 0..11 of the 12 slices, padded by one
    # air slice at the end; nothing is resized, so the tokens are the label map's own max-pool.
    ref = F.max_pool3d(torch.as_tensor(labels == 5).float()[None, None], (4, 8, 8)).flatten().numpy()
    assert np.array_equal(scan["anatomy_tokens"][0, 0], ref.astype(np.uint8))
    assert np.allclose(scan["scan"][0, :11], window01(vol[:11], *window)) and (scan["scan"][0, 11] == 0).all()
    assert scan["anatomy_tokens"][0, 1].sum() == 0 and scan["present"].tolist() == [[1, 0]]

    flipped = sampler((12, 32, 32), flip_prob=1.0)(row, np.random.default_rng(0))
    padded_flipped = np.flip(np.pad(labels[:11], [(0, 1), (0, 0), (0, 0)]), (0, 1, 2))
    ref_flipped = F.max_pool3d(torch.as_tensor(padded_flipped == 5).float()[None, None], (4, 8, 8)).flatten().numpy()
    assert np.array_equal(
        flipped["anatomy_tokens"][0, 0], ref_flipped.astype(np.uint8)
    )  # scan and labels flipped alike
    assert np.allclose(
        flipped["scan"][0],
        window01(np.flip(np.pad(vol[:11], [(0, 1), (0, 0), (0, 0)], constant_values=-1000), (0, 1, 2)), *window),
    )

    # Incomplete anatomies are not pairs: too small, or cut by the crop; with presence "in_scan" also
    # cut by the scan's own border.
    small = sampler((12, 32, 32), flip_prob=0.0, min_voxels=257)
    assert small(row, np.random.default_rng(0))["present"].tolist() == [[0, 0]]
    cropped = sampler((4, 32, 32), flip_prob=0.0)  # 4 of the liver's 4+ slices
    assert all(cropped(row, np.random.default_rng(k))["present"][0, 0] == 0 for k in range(5))
    at_edge = labels.copy()
    at_edge[0:6, 4:12, 20:28] = 5
    edge_row = _row(
        vol,
        at_edge,
        [{"anatomy": "liver", "box": [0, 4, 20, 6, 12, 28], "voxels": 384}],
        [{"anatomy": "liver", "sentences": ["A lesion in the liver."]}],
        [{"name": "liver_lesion", "value": 1}],
    )
    # fVLM checks the crop's faces only: padded beyond the scan's first slice, the liver's voxels
    # there are not on a face, so it counts; the stricter rule refuses it.
    assert scan_present(sampler((16, 32, 32), flip_prob=0.0), edge_row) == [[1, 0]]
    assert scan_present(sampler((16, 32, 32), flip_prob=0.0, presence="in_scan"), edge_row) == [[0, 0]]
    # fit="resize" (the local jobs) pads the region with air where it reaches the scan's border, so
    # the resize does not put the liver on the input's face either (the phantoms' lung and bone were
    # never paired before).
    assert scan_present(sampler((16, 32, 32), flip_prob=0.0, fit="resize"), edge_row) == [[1, 0]]
    assert scan_present(sampler((16, 32, 32), flip_prob=0.0, fit="resize", crop_margin=(0, 0, 0)), edge_row) == [[0, 0]]
    # The crop is cut around crop_anatomies only: around the lung (no box here), the whole scan.
    boxes = {"liver": [2, 4, 20, 9, 12, 28]}
    tight = {"crop_margin": (0, 0, 0)}
    assert sampler((16, 32, 32), **tight).region(vol.shape, boxes) == (slice(2, 9), slice(4, 12), slice(20, 28))
    whole = tuple(slice(0, n) for n in vol.shape)
    assert sampler((16, 32, 32), crop_anatomies=["lung"], **tight).region(vol.shape, boxes) == whole
    with pytest.raises(ValueError, match=r"crop_anatomies \['kidney'\] are not among anatomies"):
        sampler((16, 32, 32), crop_anatomies=["kidney"])
    # Embedding and evaluation keep every anatomy with voxels, cut or not (fVLM's evaluation).
    assert scan_present(sampler((16, 32, 32), evaluation=True, flip_prob=0.0), edge_row) == [[1, 0]]
    kept = sampler((4, 32, 32), evaluation=True, flip_prob=0.0)  # the crop cuts the liver: still embedded
    assert all(kept(row, np.random.default_rng(k))["present"][0, 0] == 1 for k in range(5))
    with pytest.raises(ValueError, match="multiple of the patch"):
        sampler((10, 32, 32))


class OnDevice:
    """CA-GCL's sampler followed by its device side (task.device_batch, here on the CPU): the batch
    the model sees, as numpy (the scan as float16, as the sampler windowed it before)."""

    def __init__(self, cfg: CAGCLConfig, ids: dict[str, list[int]], texts: AnatomyTexts, evaluation: bool):
        self.cfg, self.evaluation = cfg, evaluation
        self.cpu = AnatomyScanSampler(cfg, ids, texts, evaluation)
        self.lut = anatomy_lut(ids, cfg.anatomies)

    def region(self, *args: Any) -> Any:
        return self.cpu.region(*args)

    def __call__(self, row: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = self.cpu(row, rng)
        batch = device_batch({k: torch.as_tensor(v) for k, v in out.items()}, self.cfg, self.lut, self.evaluation)
        return {**out, **{k: v.numpy() for k, v in batch.items()}, "scan": batch["scan"].half().numpy()}


def plain_cagcl_sample(cfg: CAGCLConfig, ids: dict[str, list[int]], row: dict, rng, evaluation: bool) -> dict:
    """The CA-GCL sampler as it was before its device side (ctray 04da4a0, numpy only): np.pad, crop,
    np.flip, window01 and a per-anatomy np.isin pass on the CPU; the same draws in the same order."""
    size, patch, margin = cfg.input_size, cfg.patch, cfg.crop_margin
    grid = [s // p for s, p in zip(size, patch, strict=True)]
    vol = np.frombuffer(row["volume"][0], dtype=np.int16).reshape(row["shape"][0])
    lab = np.frombuffer(row["label_map"][0], dtype=np.uint8).reshape(vol.shape)
    boxes = {b["anatomy"]: b["box"] for b in row["anatomy_boxes"][0]}
    mine = [boxes[a] for a in (cfg.crop_anatomies or cfg.anatomies) if a in boxes]
    lo = [max(0, min(b[k] for b in mine) - margin[k]) for k in range(3)]
    hi = [min(vol.shape[k], max(b[k + 3] for b in mine) + margin[k]) for k in range(3)]
    cut_region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    padded = [max(s, n.stop - n.start) for s, n in zip(size, cut_region, strict=True)]
    draw = [int(rng.integers(0, n - s + 1)) for n, s in zip(padded, size, strict=True)] if not evaluation else None
    starts = draw or [(n - s) // 2 for n, s in zip(padded, size, strict=True)]
    flips = tuple(k for k in range(3) if rng.random() < cfg.flip_prob)

    def fit(v, fill):
        short = [max(0, s - n) for s, n in zip(size, v.shape, strict=True)]
        v = np.pad(v, [(d // 2, d - d // 2) for d in short], constant_values=fill)
        (z, y, x), (d, h, w) = starts, size
        return np.flip(v[z : z + d, y : y + h, x : x + w], flips)

    labels = fit(lab[cut_region], 0)
    tokens = np.zeros((len(cfg.anatomies), int(np.prod(grid))), dtype=np.uint8)
    for j, a in enumerate(cfg.anatomies):
        hit = np.isin(labels, ids[a])
        faces = (hit[0], hit[-1], hit[:, 0], hit[:, -1], hit[:, :, 0], hit[:, :, -1])
        cut = (
            cfg.presence == "in_scan"
            and a in boxes
            and (min(boxes[a][:3]) == 0 or any(e >= n for e, n in zip(boxes[a][3:], vol.shape, strict=True)))
        )
        incomplete = cut or any(f.any() for f in faces)
        if hit.sum() < cfg.min_voxels or (incomplete and not evaluation):
            continue
        pz, py, px = patch
        tokens[j] = hit.reshape(grid[0], pz, grid[1], py, grid[2], px).any(axis=(1, 3, 5)).reshape(-1)
    return {"scan": window01(fit(vol[cut_region], cfg.window_hu[0]), *cfg.window_hu), "anatomy_tokens": tokens}


def test_cagcl_device_side_equals_the_plain_numpy_sampler():
    """The crop straight into the batch, the window and token masks on the device equal the plain
    numpy path they replace, value for value, on the same seeds: padded and cut crops, flips, both
    presence rules, min_voxels, training and evaluation, on a phantom's real label map."""
    from ctray.data.phantoms import make_phantom

    p = make_phantom("p", 3, (40, 96, 96), (3.0, 2.5, 2.5))
    groups = {"lung": [10, 11, 12, 13, 14], "heart": [51, 61], "aorta": [52], "liver": [5], "bone": list(range(25, 51))}
    boxes = []
    for a, lab_ids in groups.items():
        where = np.argwhere(np.isin(p.labels, lab_ids))
        if len(where):
            boxes.append({"anatomy": a, "box": [*where.min(0).tolist(), *(where.max(0) + 1).tolist()]})
    row = {
        "volume": [p.hu.astype(np.int16).tobytes()],
        "shape": [list(p.hu.shape)],
        "label_map": [p.labels.astype(np.uint8).tobytes()],
        "anatomy_boxes": [boxes],
        "anatomy_texts": [[]],
        "labels": [[]],
    }
    tok = TextEncoding(train_wordpiece([["The liver is normal."]], 60, min_patients=1), 8)
    anatomies = list(groups)
    texts = AnatomyTexts(anatomies, {}, tok, "one")
    settings = [
        {"input_size": (16, 64, 64), "crop_anatomies": ["lung", "heart"]},  # cut from a larger region
        {"input_size": (48, 64, 128), "crop_anatomies": ["liver"]},  # padded on every axis
        {"input_size": (32, 96, 64), "presence": "in_scan", "min_voxels": 50},
    ]
    seen_tokens = 0
    for k, extra in enumerate(settings):
        cfg = CAGCLConfig(anatomies=anatomies, patch=(8, 16, 16), flip_prob=0.5, window_hu=(-1150.0, 350.0), **extra)
        for evaluation in (False, True):
            fast = OnDevice(cfg, groups, texts, evaluation)
            for seed in range(4):
                got = fast(row, np.random.default_rng(seed))
                ref = plain_cagcl_sample(cfg, groups, row, np.random.default_rng(seed), evaluation)
                assert np.array_equal(got["scan"][0], ref["scan"]), (k, evaluation, seed)
                assert np.array_equal(got["anatomy_tokens"][0].astype(np.uint8), ref["anatomy_tokens"]), (k, seed)
                assert np.array_equal(got["region"][0], ref["anatomy_tokens"].any(1)), (k, evaluation, seed)
                seen_tokens += int(ref["anatomy_tokens"].sum())
    assert seen_tokens > 0  # the comparison saw anatomies that count


def scan_present(sampler, row) -> list[list[int]]:
    return sampler(row, np.random.default_rng(0))["present"].tolist()


def test_zero_shot_metrics_equal_scikit_learn_with_ties():
    """The papers' metrics against scikit-learn's own, on random margins with ties and random labels."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(6, 80))
        margin = rng.normal(size=n).round(1)  # ties on purpose, and margins of exactly 0
        labels = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(int)
        labels[:2] = [0, 1]  # both classes
        got, pred = classification_metrics(margin, labels), (margin > 0).astype(int)
        assert got["auroc"] == pytest.approx(roc_auc_score(labels, margin), abs=1e-12), trial
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-12), trial
        assert got["weighted_f1"] == pytest.approx(f1_score(labels, pred, average="weighted"), abs=1e-12), trial
        assert got["sensitivity"] == pytest.approx(recall_score(labels, pred), abs=1e-12)
        assert got["specificity"] == pytest.approx(recall_score(labels, pred, pos_label=0), abs=1e-12)
        assert got["precision"] == pytest.approx(precision_score(labels, pred, zero_division=0), abs=1e-12)
    assert math.isnan(auroc(np.zeros(5), np.zeros(5, dtype=int)))


def test_zero_shot_auroc_does_not_change_with_the_temperature():
    """Ranking by the logit margin: a model that only sharpens (tau 0.07 -> 0.001) keeps its AUROC,
    where float32 softmax probabilities saturate at 1.0 and tie."""
    gen = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(200, 16, generator=gen), dim=-1)
    pos, neg = F.normalize(torch.randn(2, 16, generator=gen), dim=-1)
    labels = ((v @ pos - v @ neg) + 0.3 * torch.randn(200, generator=gen) > 0).int().numpy()
    warm, sharp = (classification_metrics(logit_margins(v, pos, neg, 1 / tau), labels) for tau in (0.07, 0.001))
    assert sharp["auroc"] == warm["auroc"] and sharp["balanced_accuracy"] == warm["balanced_accuracy"]
    probabilities = (torch.stack([v @ pos, v @ neg], 1) / 0.001).softmax(1)[:, 0].numpy()  # float32
    assert auroc(probabilities, labels) < warm["auroc"]  # what ranking by saturated probabilities costs


def test_losses_without_pairs_are_zero_and_still_backpropagate():
    v, r, _ = embeddings(b=4, a=2)
    none = torch.zeros(4, 2, dtype=torch.bool)
    loss = AnatomyLocalLoss()(v, r, none, torch.tensor(10.0, dtype=torch.float64)).sum() + CrossAnatomyGlobalLoss()(
        v, r, none, torch.tensor(10.0)
    )
    loss.backward()  # a batch without any pair must not break the optimizer step
    assert loss.item() == 0 and v.grad is not None and v.grad.abs().sum() == 0


def test_trained_tokenizer_learns_no_word_of_few_reports():
    """A name in two reports must not become vocabulary (the tokenizer file is saved with the run)."""
    from tokenizers import Tokenizer

    common = ["The liver is normal.", "No pleural effusion.", "Heart size is normal."]
    reports = [common + (["Compared with the study read by Dr Quillfeather."] if i < 2 else []) for i in range(10)]
    vocab = Tokenizer.from_str(train_wordpiece(reports, 300, min_patients=5)).get_vocab()
    assert {"liver", "pleural", "normal"} <= set(vocab)
    assert not [t for t in vocab if "quill" in t or "feather" in t]
    assert set(Tokenizer.from_str(train_wordpiece(reports, 300, min_patients=2)).get_vocab()) & {
        "quillfeather",
        "quill",
        "##feather",
    }


def test_trained_tokenizer_counts_patients_not_reports_and_never_learns_numbers_or_header_values():
    """One patient with many reports puts no word of theirs in the vocabulary; a word of 5 patients
    is learned; an MRN-like digit run and a header field's value are not, however many patients
    have them."""
    from tokenizers import Tokenizer

    common = ["The liver is normal.", "No pleural effusion."]
    reports = [
        *([[*common, "Patient Zebedee Wrightwood returns."]] * 8),  # one patient, eight reports
        *([[*common, "Mild gallbladder sludge."]] * 5),  # five patients
        *([[*common, "Accession 40817263 reviewed.", "Referring: Dr Ostrowicz."]] * 6),  # six more patients
    ]
    patients = ["p0"] * 8 + [f"p{i}" for i in range(1, 12)]
    vocab = set(Tokenizer.from_str(train_wordpiece(reports, 300, min_patients=5, patients=patients)).get_vocab())
    assert {"liver", "gallbladder", "sludge", "accession", "referring"} <= vocab
    assert not [t for t in vocab if "zeb" in t or "wright" in t or "ostrow" in t]
    assert not [t for t in vocab if t.strip("#").isdigit() and len(t.strip("#")) >= 3]
    # Counted by report, as before, the one patient's name would be in it.
    by_report = set(Tokenizer.from_str(train_wordpiece(reports, 300, min_patients=5)).get_vocab())
    assert {"zebedee", "wrightwood"} <= by_report


def _naive_wordpiece(counts: dict[str, int], vocab_size: int, min_frequency: int) -> list[str]:
    """BPE merges by recounting every pair each round; ties to the first pair in code-point order."""
    from ctray.data.text import SPECIAL_TOKENS

    pieces = {w: [w[0], *("##" + c for c in w[1:])] for w in counts}
    vocab = [*SPECIAL_TOKENS, *sorted({p for ps in pieces.values() for p in ps})]
    while len(vocab) < vocab_size:
        pairs: dict[tuple[str, str], int] = {}
        for w, ps in pieces.items():
            for pair in itertools.pairwise(ps):
                pairs[pair] = pairs.get(pair, 0) + counts[w]
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[pair] < min_frequency:
            break
        merged = pair[0] + pair[1][2:]
        for w, ps in pieces.items():
            out, i = [], 0
            while i < len(ps):
                if i + 1 < len(ps) and (ps[i], ps[i + 1]) == pair:
                    out, i = [*out, merged], i + 2
                else:
                    out, i = [*out, ps[i]], i + 1
            pieces[w] = out
        if merged not in vocab:
            vocab.append(merged)
    return vocab


def test_wordpiece_vocab_equals_naive_merges_and_is_the_same_in_every_process():
    """The tokenizer is a function of the corpus and its settings: the incremental merges equal a
    naive loop's, and two processes with other hash seeds write the same tokenizer.json bytes (the
    tokenizers library's own trainer did not: its ties go in hash-map order)."""
    import subprocess
    import sys
    from collections import Counter

    from ctray.data.text import wordpiece_vocab

    rng = np.random.default_rng(7)
    letters = list("abcdeéx")
    words = ["".join(rng.choice(letters, size=rng.integers(1, 9))) for _ in range(300)]
    counts = Counter({w: int(rng.integers(1, 6)) for w in words})
    for size, floor in ((40, 1), (120, 2), (1000, 1)):
        assert wordpiece_vocab(counts, size, floor) == _naive_wordpiece(dict(counts), size, floor)

    script = (
        "from ctray.data.text import train_wordpiece; import sys; "
        "r = [['the liver is normal', 'a lesion in segment ' + str(i % 7)] for i in range(40)]; "
        "sys.stdout.write(train_wordpiece(r, 80, 2))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, check=True
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_cagcl_reports_how_often_each_anatomy_formed_a_pair_and_warns_of_rare_scored_ones():
    """Each anatomy's share of the batch's scans in which it formed a pair (region and text) is a
    metric of every step; a scored anatomy under 10% is worth a warning, others are not."""
    from ctray.objectives.cagcl.task import synthetic_batch

    from helpers import tiny_task

    task, cfg, _ = tiny_task("cagcl")
    batch = synthetic_batch(cfg.objective, 4, torch.device("cpu"))
    batch["has_text"][:, 0] = torch.tensor([1, 0, 0, 0], dtype=batch["has_text"].dtype)  # the first anatomy: 1 of 4
    out = task(batch)
    first = task.anatomies[0]
    assert out[f"anatomy_pairs.{first}"].item() == pytest.approx(0.25)
    want = task.on_device(batch, evaluation=False)["present"].float().mean(0)
    assert [out[f"anatomy_pairs.{a}"].item() for a in task.anatomies] == pytest.approx(want.tolist())
    scored = set(cfg.objective.zero_shot.findings.values())
    rare = {a: 0.05 for a in task.anatomies}
    advice = task.advice({f"anatomy_pairs.{a}": v for a, v in rare.items()})
    assert set(advice) == scored & set(task.anatomies) and all("formed a pair in 5%" in v for v in advice.values())
    assert task.advice({f"anatomy_pairs.{a}": 0.5 for a in task.anatomies}) == {}
