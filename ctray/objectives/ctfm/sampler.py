"""CT-FM's CPU side (numpy only): M random patches per scan, cut from the stored int16 volume."""

from __future__ import annotations

from typing import Any

import numpy as np

from ctray.data.samplers import output_bytes, volumes


class PatchSampler:
    """M random patches per scan (CT-FM): rows -> {"patches": int16 (rows, M, d, h, w)}.

    Patch corners are uniform over the volume (MONAI RandSpatialCropSamples, as CT-FM); a volume
    smaller than a patch along an axis is first padded with `pad` HU (air), as CT-FM's SpatialPad.
    """

    columns = ("volume", "shape")

    def __init__(self, patches_per_scan: int, patch_size: tuple[int, int, int], pad: int = -1024):
        self.m = patches_per_scan
        self.size = tuple(patch_size)
        self.pad = pad
        self.bulk = {"patches": ((self.m, *self.size), np.int16)}
        self.draw_bytes = output_bytes(self.bulk)

    def sample(self, vol: np.ndarray, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
        """M patches of `vol`: int16 (M, d, h, w), written into `out` if given."""
        if out is None:
            out = np.empty((self.m, *self.size), dtype=np.int16)
        short = [max(0, p - s) for p, s in zip(self.size, vol.shape, strict=False)]
        if any(short):
            vol = np.pad(vol, [(d // 2, d - d // 2) for d in short], constant_values=self.pad)
        starts = [rng.integers(0, s - p + 1, size=self.m) for s, p in zip(vol.shape, self.size, strict=False)]
        d, h, w = self.size
        for i in range(self.m):
            z, y, x = starts[0][i], starts[1][i], starts[2][i]
            out[i] = vol[z : z + d, y : y + h, x : x + w]
        return out

    def __call__(
        self, batch: Any, rng: np.random.Generator, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        vols = volumes(batch)
        patches = np.empty((len(vols), self.m, *self.size), dtype=np.int16) if out is None else out["patches"]
        for row, vol in enumerate(vols):  # straight into the batch: np.stack would copy every patch again
            self.sample(vol, rng, patches[row])
        return {"patches": patches}
