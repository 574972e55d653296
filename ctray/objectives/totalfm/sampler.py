"""TotalFM's CPU side (numpy only): organ volumes cut from the scan by their stored boxes, and (stage
2) one finding sentence per organ through the shared anatomy-text sampler."""

from __future__ import annotations

from typing import Any

import numpy as np

from ctray.data.samplers import AnatomyTexts, small_columns, volumes, window01
from ctray.objectives.totalfm.config import OrganInput
from ctray.resample import resample_linear, size_maps


class OrganSampler:
    """TotalFM organ volumes: rows -> {"organs": float16 (S, A, T, H, W) in [0, 1], "present": ...}.

    For each anatomy of `organs` with a stored bounding box: the box plus `margin_mm` on every side (clipped to
    the scan), resampled linearly to `size` (T axial slices = the frames of a video, H, W) and
    windowed. Batches are organ-separated: axis 1 is the organ, so every organ's volumes stay
    together and the contrastive stage draws its negatives within an organ. With `texts` set (stage
    2) the anatomy text fields are added and "present" also needs a text.
    """

    def __init__(self, organs: OrganInput, texts: AnatomyTexts | None = None):
        self.anatomies = list(organs.anatomies)
        self.size = organs.size
        self.margin_mm = organs.margin_mm
        self.window = organs.window_hu
        self.texts = texts
        self.columns = ("volume", "shape", "spacing", "anatomy_boxes") + (texts.columns if texts else ())

    def organ(self, vol: np.ndarray, box: list[int], spacing: list[float]) -> np.ndarray:
        lo = [max(0, b - round(self.margin_mm / sp)) for b, sp in zip(box[:3], spacing, strict=False)]
        hi = [min(n, b + round(self.margin_mm / sp)) for b, sp, n in zip(box[3:], spacing, vol.shape, strict=False)]
        crop = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        maps = size_maps(crop.shape, self.size)
        return window01(resample_linear(crop, maps), *self.window)

    def __call__(self, batch: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows = small_columns(batch, self.columns)
        organs = np.zeros((len(rows), len(self.anatomies), *self.size), dtype=np.float16)
        region = np.zeros((len(rows), len(self.anatomies)), dtype=bool)
        for i, (vol, row) in enumerate(zip(volumes(batch), rows, strict=False)):
            boxes = {b["anatomy"]: b["box"] for b in row["anatomy_boxes"] or []}
            for j, anatomy in enumerate(self.anatomies):
                if anatomy in boxes:
                    organs[i, j] = self.organ(vol, boxes[anatomy], row["spacing"])
                    region[i, j] = True
        out: dict[str, np.ndarray] = {
            "organs": organs,
            "present": region.astype(np.uint8),
            "region": region.astype(np.uint8),
        }
        if self.texts is not None:
            out.update(self.texts(rows, region, rng))
        return out
