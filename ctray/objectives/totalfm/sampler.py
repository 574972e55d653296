"""TotalFM's CPU side (numpy only): organ volumes cut from the scan by their stored boxes (or read
from the shard set's organ cache, cut once), and (stage 2) one finding sentence per organ through
the shared anatomy-text sampler."""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np

from ctray.data.samplers import AnatomyTexts, output_bytes, small_columns, volumes, window01
from ctray.ingest.derived import per_shard_folder
from ctray.objectives.totalfm.config import OrganInput
from ctray.objectives.totalfm.organ_cache import CACHE_COLUMNS, ORGAN_CACHE, cache_key, organ_arrays
from ctray.resample import resample_linear, size_maps


class OrganSampler:
    """TotalFM organ volumes: rows -> {"organs": float16 (S, A, T, H, W) in [0, 1], "present": ...}.

    For each anatomy of `organs` with a stored bounding box: the box plus `margin_mm` on every side (clipped to
    the scan), resampled linearly to `size` (T axial slices = the frames of a video, H, W) and
    windowed. Batches are organ-separated: axis 1 is the organ, so every organ's volumes stay
    together and the contrastive stage draws its negatives within an organ. With `texts` set (stage
    2) the anatomy text fields are added and "present" also needs a text.

    `cached`: the organ volumes come from the shard set's organ cache (organ_cache: cut once by the
    driver, the same values), read beside each shard (`side_file`), instead of from the scan at
    every draw; the cache must hold every shard read (the recipe's prepare() makes sure it does for
    the training shards; embedding and evaluation, on any shard set, cut).
    """

    def __init__(self, organs: OrganInput, texts: AnatomyTexts | None = None, cached: bool = False):
        self.anatomies = list(organs.anatomies)
        self.size = organs.size
        self.margin_mm = organs.margin_mm
        self.window = organs.window_hu
        self.texts = texts
        self.key = cache_key(organs) if cached else None
        self.cut_columns = ("volume", "shape", "spacing", "anatomy_boxes")
        text_columns = texts.columns if texts else ()
        self.columns = text_columns if cached else self.cut_columns + text_columns
        self.side_columns = CACHE_COLUMNS
        self.bulk = {"organs": ((len(self.anatomies), *self.size), np.float16)}
        self.draw_bytes = output_bytes(self.bulk)

    def side_file(self, shard: str) -> str | None:
        """The organ cache file of the shard at path `shard` (ShardRowReader reads `side_columns`
        of the same row group from it), or None when not cached."""
        if self.key is None:
            return None
        root = posixpath.dirname(posixpath.dirname(shard))  # <shard set>/shards/<name>
        return posixpath.join(per_shard_folder(root, ORGAN_CACHE, self.key), posixpath.basename(shard))

    def organ(self, vol: np.ndarray, box: list[int], spacing: list[float]) -> np.ndarray:
        lo = [max(0, b - round(self.margin_mm / sp)) for b, sp in zip(box[:3], spacing, strict=False)]
        hi = [min(n, b + round(self.margin_mm / sp)) for b, sp, n in zip(box[3:], spacing, vol.shape, strict=False)]
        crop = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        maps = size_maps(crop.shape, self.size)
        return window01(resample_linear(crop, maps), *self.window)

    def cut(self, vol: np.ndarray, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """One scan's organ volumes (A, T, H, W) and which organs have a box ("region", (A,) bool)."""
        organs = np.zeros((len(self.anatomies), *self.size), dtype=np.float16)
        region = np.zeros(len(self.anatomies), dtype=bool)
        boxes = {b["anatomy"]: b["box"] for b in row["anatomy_boxes"] or []}
        for j, anatomy in enumerate(self.anatomies):
            if anatomy in boxes:
                organs[j] = self.organ(vol, boxes[anatomy], row["spacing"])
                region[j] = True
        return {"organs": organs, "region": region}

    def __call__(
        self, batch: Any, rng: np.random.Generator, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        rows = small_columns(batch, self.columns)
        if self.key is not None:
            cuts = organ_arrays(batch, len(self.anatomies), self.size)
        else:
            cutting = small_columns(batch, self.cut_columns)
            cuts = [self.cut(vol, row) for vol, row in zip(volumes(batch), cutting, strict=True)]
        if out is not None:
            organs = out["organs"]
            for i, c in enumerate(cuts):
                organs[i] = c["organs"]
        else:
            organs = np.stack([c["organs"] for c in cuts]) if len(cuts) > 1 else cuts[0]["organs"][None]
        region = np.stack([c["region"] for c in cuts])
        fields: dict[str, np.ndarray] = {
            "organs": organs,
            "present": region.astype(np.uint8),
            "region": region.astype(np.uint8),
        }
        if self.texts is not None:
            fields.update(self.texts(rows, region, rng))
        return fields
