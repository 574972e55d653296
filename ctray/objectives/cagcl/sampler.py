"""CA-GCL's CPU side (numpy only), following fVLM's released data pipeline (which CA-GCL adopts):
the scan at its ingest spacing (fVLM: 3 x 1 x 1 mm), cut to the anatomies' region plus a margin,
padded to and randomly cropped at the ViT input, randomly flipped, windowed; each complete
anatomy's mask max-pooled to the token grid; clinical-aware texts through the shared sampler."""

from __future__ import annotations

from typing import Any

import numpy as np

from ctray.data.samplers import AnatomyTexts, small_columns, volumes, window01
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.resample import resample_linear, resample_nearest, size_maps


class AnatomyScanSampler:
    """CA-GCL scans: rows -> {"scan": float16 (S, D, H, W) in [0, 1], "anatomy_tokens": uint8
    (S, A, tokens), "region", text fields}.

    As fVLM's preprocessing (data/preprocess.py, lavis/processors/blip_processors.py): the scan
    is cut to the bounding box of its anatomies (the union of their stored boxes) plus `crop_margin`
    voxels (fVLM: 5 slices, 20 voxels in-plane), padded symmetrically to at least `size` with air
    (the window's low end), cropped at `size` at a random corner, and flipped along each axis with
    probability `flip_prob` (fVLM: 0.2) — no resizing, so physical scale is kept. The label map
    takes the same cut, crop and flips.

    An anatomy counts only when complete (the paper's N_j, fVLM's "remove incomplete organs
    caused by random crop"): at least `min_voxels` voxels in the crop and none on the crop's faces
    (presence "crop_faces", as fVLM's forward checks it, after padding), and with presence
    "in_scan" also its stored box not touching the scan's own border. The crop is cut around
    `crop_anatomies` (default: all). With fit="resize" the region is resampled to `size` instead
    of padded and cropped (tiny local models on whole-body phantoms; not fVLM). Its voxels
    max-pooled to the ViT token grid (`patch`) select the tokens its query attends to, done here so
    the device receives a few bytes per anatomy.
    """

    def __init__(
        self, cfg: CAGCLConfig, anatomy_ids: dict[str, list[int]], texts: AnatomyTexts, evaluation: bool = False
    ) -> None:
        """`anatomy_ids`: each of cfg.anatomies' label ids (Assets.anatomy_labels); the config has
        checked that the input tiles into patches. `evaluation`: embedding, not training: the crop
        is centred, and every anatomy with voxels in it counts, complete or not (fVLM's evaluation
        keeps every organ with voxels; only training needs complete ones for its pairs)."""
        self.evaluation = evaluation
        self.anatomy_ids = {a: list(anatomy_ids[a]) for a in cfg.anatomies}
        self.size, self.patch = cfg.input_size, cfg.patch
        self.grid = tuple(s // p for s, p in zip(self.size, self.patch, strict=True))
        self.window = cfg.window_hu
        self.texts = texts
        self.margin, self.flip_prob, self.min_voxels = cfg.crop_margin, cfg.flip_prob, cfg.min_voxels
        self.resize = cfg.fit == "resize"
        self.in_scan = cfg.presence == "in_scan"
        self.crop_anatomies = list(cfg.crop_anatomies or cfg.anatomies)
        self.columns = ("volume", "shape", "label_map", "anatomy_boxes", *texts.columns)

    def region(self, shape: tuple[int, ...], boxes: dict[str, list[int]]) -> tuple[slice, slice, slice]:
        """The crop anatomies' bounding box plus the margin, within the scan (the whole scan without boxes)."""
        mine = [boxes[a] for a in self.crop_anatomies if a in boxes]
        if not mine:
            return slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])
        lo = [max(0, min(b[k] for b in mine) - self.margin[k]) for k in range(3)]
        hi = [min(shape[k], max(b[k + 3] for b in mine) + self.margin[k]) for k in range(3)]
        return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])

    def beyond(self, shape: tuple[int, ...], cut: tuple[slice, slice, slice]) -> list[tuple[int, int]]:
        """fit="resize": air padding of `crop_margin` on each side where the region reaches the
        scan's border, before the resize. Without it an organ reaching the field of view's edge
        would sit on the resized input's face and never count; with it, as fVLM's padding does, the
        border is not a cut."""
        return [
            (m if c.start == 0 else 0, m if c.stop == n else 0) for c, m, n in zip(cut, self.margin, shape, strict=True)
        ]

    def fit(
        self, vol: np.ndarray, fill: float, starts: list[int], nearest: bool = False, pad: Any = None
    ) -> np.ndarray:
        """Pad (symmetrically, with `fill`) to at least `size`, then crop `size` at `starts`; or,
        with fit="resize", pad by `pad` and resample the whole region to `size` (linear, or nearest
        for labels)."""
        if self.resize:
            if pad is not None and any(a or b for a, b in pad):
                vol = np.pad(vol, pad, constant_values=fill)
            maps = size_maps(vol.shape, self.size)
            return resample_nearest(vol, maps) if nearest else resample_linear(vol, maps)
        short = [max(0, s - n) for s, n in zip(self.size, vol.shape, strict=True)]
        if any(short):
            vol = np.pad(vol, [(d // 2, d - d // 2) for d in short], constant_values=fill)
        (z, y, x), (d, h, w) = starts, self.size
        return vol[z : z + d, y : y + h, x : x + w]

    def token_masks(self, labels: np.ndarray, cut: list[bool]) -> np.ndarray:
        """(D, H, W) label ids of the crop -> (A, tokens) uint8 for the complete anatomies (`cut`:
        the anatomy's stored box touches the scan's border)."""
        g = self.grid
        pz, py, px = self.patch
        out = np.zeros((len(self.anatomy_ids), int(np.prod(g))), dtype=np.uint8)
        for j, ids in enumerate(self.anatomy_ids.values()):
            hit = np.isin(labels, ids)
            faces = (hit[0], hit[-1], hit[:, 0], hit[:, -1], hit[:, :, 0], hit[:, :, -1])
            incomplete = cut[j] or any(f.any() for f in faces)
            if hit.sum() < self.min_voxels or (incomplete and not self.evaluation):
                continue
            out[j] = hit.reshape(g[0], pz, g[1], py, g[2], px).any(axis=(1, 3, 5)).reshape(-1)
        return out

    def __call__(self, batch: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows = small_columns(batch, self.columns)
        label_maps = batch["label_map"] if isinstance(batch, dict) else batch.column("label_map").to_pylist()
        scans = np.zeros((len(rows), *self.size), dtype=np.float16)
        tokens = np.zeros((len(rows), len(self.anatomy_ids), int(np.prod(self.grid))), dtype=np.uint8)
        for i, (vol, lab, row) in enumerate(zip(volumes(batch), label_maps, rows, strict=True)):
            boxes = {b["anatomy"]: b["box"] for b in row["anatomy_boxes"] or []}
            cut_region = self.region(vol.shape, boxes)
            padded = [
                max(s, n.stop - n.start) if not self.resize else s for s, n in zip(self.size, cut_region, strict=True)
            ]
            starts = [
                (n - s) // 2 if self.evaluation else int(rng.integers(0, n - s + 1))
                for n, s in zip(padded, self.size, strict=True)
            ]
            flips = tuple(k for k in range(3) if rng.random() < self.flip_prob)
            pad = self.beyond(vol.shape, cut_region) if self.resize and boxes else None
            scan = self.fit(vol[cut_region], self.window[0], starts, pad=pad)
            scans[i] = window01(np.flip(scan, flips) if flips else scan, *self.window)
            if lab is not None:
                labels = self.fit(
                    np.frombuffer(lab, dtype=np.uint8).reshape(vol.shape)[cut_region], 0, starts, nearest=True, pad=pad
                )
                cut = [
                    self.in_scan
                    and a in boxes
                    and (min(boxes[a][:3]) == 0 or any(e >= n for e, n in zip(boxes[a][3:], vol.shape, strict=True)))
                    for a in self.anatomy_ids
                ]
                tokens[i] = self.token_masks(np.flip(labels, flips) if flips else labels, cut)
        region = np.asarray(tokens.any(axis=2))
        out: dict[str, np.ndarray] = {"scan": scans, "anatomy_tokens": tokens, "region": region.astype(np.uint8)}
        out.update(self.texts(rows, region, rng))
        return out
