"""TotalSegmentator (v2, task "total") as a mask source for scans that come without one.

TotalSegmentator downloads its weights on first use; ingest never does that behind the user's
back (cluster nodes are often offline), so the weights are checked up front with a clear error.
"""

from __future__ import annotations

import glob
import os

import nibabel as nib
import numpy as np

from ctray.errors import ConfigError
from ctray.ingest.volume import RawVolume

# nnU-Net dataset folders that hold the "total" task's weights in TotalSegmentator v2.
_TOTAL_DATASETS = ("Dataset291_*", "Dataset292_*", "Dataset293_*", "Dataset294_*", "Dataset295_*")
_TOTAL_FAST_DATASETS = ("Dataset297_*",)


def weights_dir() -> str:
    try:
        from totalsegmentator.config import get_weights_dir
    except ImportError as e:
        raise ConfigError(
            "input.segment is true but TotalSegmentator is not installed: pip install 'ctray[segment]'"
        ) from e
    return str(get_weights_dir())


def check_weights(fast: bool) -> None:
    """Raise ConfigError naming the folder and the fix when the task's weights are absent."""
    root = weights_dir()
    wanted = _TOTAL_FAST_DATASETS if fast else _TOTAL_DATASETS
    missing = [w.rstrip("_*") for w in wanted if not glob.glob(os.path.join(root, w))]
    if missing:
        task = "total_fast" if fast else "total"
        raise ConfigError(
            f"TotalSegmentator weights for task {task!r} are not installed in {root} "
            f"(missing {', '.join(missing)}); run `totalseg_download_weights -t {task}` on a machine "
            "with network access, or point TOTALSEG_WEIGHTS_PATH at a copy"
        )


class Segmenter:
    """Callable: RawVolume (scan) -> RawVolume (label map on the same grid)."""

    def __init__(self, fast: bool) -> None:
        check_weights(fast)
        import torch
        from totalsegmentator.python_api import totalsegmentator

        self._run = totalsegmentator
        self.fast = fast
        self.device = "gpu" if torch.cuda.is_available() else "cpu"

    def __call__(self, scan: RawVolume) -> RawVolume:
        img = nib.Nifti1Image(np.asarray(scan.data), scan.affine)
        img.header.set_slope_inter(scan.slope, scan.inter)
        seg = self._run(img, None, task="total", fast=self.fast, device=self.device, quiet=True)
        return RawVolume(
            np.asarray(seg.dataobj, dtype=np.uint8), scan.affine, 1.0, 0.0, f"{scan.source} (TotalSegmentator)"
        )
