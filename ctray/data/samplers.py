"""CPU samplers: shard rows -> training examples, run in Ray Data map_batches tasks.

Only numpy and the shard schema here: every Ray Data task process unpickles its sampler, and a
sampler that imported torch or MONAI would cost each new process seconds before its first scan.
"""

from __future__ import annotations

import numpy as np

from ctray.data.schema import volume_of


class PatchSampler:
    """M random patches per scan (CT-FM): rows -> {"patches": int16 (rows, M, d, h, w)}.

    Patch corners are uniform over the volume (MONAI RandSpatialCropSamples, as CT-FM); a volume
    smaller than a patch along an axis is first padded with `pad` HU (air), as CT-FM's SpatialPad.
    """

    columns = ("volume", "shape")

    def __init__(self, patches_per_scan: int, patch_size: tuple[int, int, int], pad: int = -1024, seed: int | None = None):
        self.m = patches_per_scan
        self.size = tuple(patch_size)
        self.pad = pad
        self.seed = seed

    def sample(self, vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((self.m, *self.size), dtype=np.int16)
        short = [max(0, p - s) for p, s in zip(self.size, vol.shape)]
        if any(short):
            vol = np.pad(vol, [(d // 2, d - d // 2) for d in short], constant_values=self.pad)
        starts = [rng.integers(0, s - p + 1, size=self.m) for s, p in zip(vol.shape, self.size)]
        d, h, w = self.size
        for i in range(self.m):
            z, y, x = starts[0][i], starts[1][i], starts[2][i]
            out[i] = vol[z : z + d, y : y + h, x : x + w]
        return out

    def __call__(self, batch) -> dict:
        # Fresh entropy per call (Ray ships this object to every task, so a generator stored in it
        # would replay the same patch positions each epoch); a fixed seed is for tests.
        rng = np.random.default_rng(self.seed)
        return {"patches": np.stack([self.sample(vol, rng) for vol in volumes(batch)])}


def volumes(batch) -> list[np.ndarray]:
    """The int16 volumes of a batch of shard rows, without copying them.

    A pyarrow batch (map_batches batch_format="pyarrow") is read straight from the Arrow data
    buffer: the numpy batch format would first copy every volume into a Python bytes object,
    which costs more than sampling the patches. A dict of columns (tests, numpy format) works too.
    """
    if isinstance(batch, dict):
        return [volume_of({"volume": v, "shape": s}) for v, s in zip(batch["volume"], batch["shape"])]
    col = batch.column("volume").combine_chunks()
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + len(col) + 1]
    data = col.buffers()[2]
    shapes = batch.column("shape").to_pylist()
    return [
        np.frombuffer(data, dtype=np.int16, count=(int(offsets[i + 1]) - int(offsets[i])) // 2, offset=int(offsets[i])).reshape(shapes[i])
        for i in range(len(col))
    ]
