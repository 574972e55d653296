"""CA-GCL's CPU side (numpy only), following fVLM's released data pipeline (which CA-GCL adopts):
the scan at its ingest spacing (fVLM: 3 x 1 x 1 mm), cut to the anatomies' region plus a margin,
padded to and randomly cropped at the ViT input, randomly flipped, with its label map cut alike;
clinical-aware texts through the shared sampler. Windowing and the anatomies' token masks are the
device's (task.device_batch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ctray.data.samplers import AnatomyTexts, label_maps, output_bytes, small_columns, volumes
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.resample import resample_linear, resample_nearest, size_maps


class AnatomyScanSampler:
    """CA-GCL scans: rows -> {"scan": int16 HU (S, D, H, W), "labels": uint8 (S, D, H, W) label ids
    of the same crop, "anatomy_cut": uint8 (S, A), text fields}; the device windows the scan and
    turns the labels into token masks and presence (task.anatomy_masks).

    As fVLM's preprocessing (data/preprocess.py, lavis/processors/blip_processors.py): the scan
    is cut to the bounding box of its anatomies (the union of their stored boxes) plus `crop_margin`
    voxels (fVLM: 5 slices, 20 voxels in-plane), padded symmetrically to at least `size` with air
    (the window's low end), cropped at `size` at a random corner, and flipped along each axis with
    probability `flip_prob` (fVLM: 0.2) — no resizing, so physical scale is kept. The label map
    takes the same cut, crop and flips. With fit="resize" the region is resampled to `size` instead
    of padded and cropped (tiny local models on whole-body phantoms; not fVLM).

    Which anatomies count (complete ones in training, any with voxels in evaluation) and their
    tokens are decided on the device from "labels" (`anatomy_masks`): on the CPU that pass over
    every voxel of the crop cost 250-350 ms per scan at fVLM's input (`ctray bench data`), 70
    cores per GPU at CA-GCL's target. Here only the stored boxes are used: "anatomy_cut" is 1 where
    presence is "in_scan" and the anatomy's stored box touches the scan's border. Texts are drawn
    for every anatomy the report describes; the device pairs only those that count.
    """

    def __init__(
        self, cfg: CAGCLConfig, anatomy_ids: dict[str, list[int]], texts: AnatomyTexts, evaluation: bool = False
    ) -> None:
        """`anatomy_ids`: each of cfg.anatomies' label ids (Assets.anatomy_labels); the config has
        checked that the input tiles into patches. `evaluation`: embedding, not training: the crop
        is centred."""
        self.evaluation = evaluation
        self.anatomies = list(cfg.anatomies)
        self.size = cfg.input_size
        self.window = cfg.window_hu
        self.texts = texts
        self.margin, self.flip_prob = cfg.crop_margin, cfg.flip_prob
        self.resize = cfg.fit == "resize"
        self.in_scan = cfg.presence == "in_scan"
        self.crop_anatomies = list(cfg.crop_anatomies or cfg.anatomies)
        self.columns = ("volume", "shape", "label_map", "anatomy_boxes", *texts.columns)
        self.bulk = {"scan": (self.size, np.int16), "labels": (self.size, np.uint8)}
        self.draw_bytes = output_bytes(self.bulk)

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
        self,
        out: np.ndarray,
        vol: np.ndarray,
        fill: float,
        starts: list[int],
        flips: tuple[int, ...],
        nearest: bool = False,
        pad: Any = None,
    ) -> None:
        """Into `out` (`size`): `vol` padded (symmetrically, with `fill`) to at least `size`, cut at
        `starts` and flipped along `flips`; or, with fit="resize", padded by `pad` and resampled
        whole to `size` (linear, or nearest for labels). The crop is one copy straight into `out`
        (np.pad and np.flip would each copy the region again)."""
        if self.resize:
            if pad is not None and any(a or b for a, b in pad):
                vol = np.pad(vol, pad, constant_values=fill)
            maps = size_maps(vol.shape, self.size)
            out[...] = np.flip(resample_nearest(vol, maps) if nearest else resample_linear(vol, maps), flips)
            return
        src, dst = [], []
        for n, s, st in zip(vol.shape, self.size, starts, strict=True):
            before = max(0, s - n) // 2  # the padding before the region, in the padded frame
            lo, hi = max(0, st - before), min(n, st - before + s)
            src.append(slice(lo, hi))
            dst.append(slice(lo - (st - before), hi - (st - before)))
        view = np.flip(out, flips)
        view[tuple(dst)] = vol[tuple(src)]
        for axis, d in enumerate(dst):  # the padding: the slabs around the copied box, each once
            before = (*dst[:axis], slice(0, d.start))
            after = (*dst[:axis], slice(d.stop, None))
            view[before] = fill
            view[after] = fill

    def __call__(
        self, batch: Any, rng: np.random.Generator, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        rows = small_columns(batch, self.columns)
        n = len(rows)
        scans = np.empty((n, *self.size), dtype=np.int16) if out is None else out["scan"]
        labels = np.empty((n, *self.size), dtype=np.uint8) if out is None else out["labels"]
        cut = np.zeros((n, len(self.anatomies)), dtype=np.uint8)
        for i, (vol, lab, row) in enumerate(zip(volumes(batch), label_maps(batch), rows, strict=True)):
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
            self.fit(scans[i], vol[cut_region], int(self.window[0]), starts, flips, pad=pad)
            if lab is None:
                labels[i] = 0
            else:  # fit writes every voxel of the crop
                self.fit(labels[i], lab[cut_region], 0, starts, flips, nearest=True, pad=pad)
                if self.in_scan:
                    cut[i] = [a in boxes and touches_border(boxes[a], vol.shape) for a in self.anatomies]
        described = np.ones((n, len(self.anatomies)), dtype=bool)  # which count is the device's call
        text = self.texts(rows, described, rng)
        text["has_text"] = text.pop("present")
        return {"scan": scans, "labels": labels, "anatomy_cut": cut, **text}


def touches_border(box: list[int], shape: tuple[int, ...]) -> bool:
    """The stored box (z0, y0, x0, z1, y1, x1) reaches the scan's border: the scan cuts the anatomy."""
    return min(box[:3]) == 0 or any(e >= n for e, n in zip(box[3:], shape, strict=True))
