"""CT-FM's embedding input (numpy only): the whole scan as a grid of patches, for `ctray embed`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ctray.data.samplers import volumes


def tile_starts(n: int, p: int) -> list[int]:
    """Starts of patches of length p covering [0, n) (n >= p): stride p, the last one flush with the end."""
    starts = list(range(0, n - p + 1, p))
    if starts[-1] + p < n:
        starts.append(n - p)
    return starts


class SlidingPatches:
    """One scan -> every patch of a grid covering it (stride = patch size, the last patch of each
    axis flush with the scan's end; a scan smaller than a patch padded with `pad` HU as in training):
    {"patches": int16 (1, M, d, h, w), "patch_origin": int32 (1, M, 3), each patch's first voxel in
    the scan's (z, y, x) grid (negative where padded)}. Deterministic: `rng` is not used. Rows with
    different shapes give different M, so it takes one row at a time."""

    columns = ("volume", "shape")

    def __init__(self, patch_size: tuple[int, int, int], pad: int = -1024):
        self.size = tuple(patch_size)
        self.pad = pad

    def __call__(self, batch: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        (vol,) = volumes(batch)
        short = [max(0, p - s) for p, s in zip(self.size, vol.shape, strict=True)]
        if any(short):
            vol = np.pad(vol, [(d // 2, d - d // 2) for d in short], constant_values=self.pad)
        grid = [tile_starts(n, p) for n, p in zip(vol.shape, self.size, strict=True)]
        origins = np.array([(z, y, x) for z in grid[0] for y in grid[1] for x in grid[2]], dtype=np.int32)
        d, h, w = self.size
        patches = np.stack([vol[z : z + d, y : y + h, x : x + w] for z, y, x in origins])
        shift = np.array([s // 2 for s in short], dtype=np.int32)
        return {"patches": patches[None], "patch_origin": (origins - shift)[None]}
