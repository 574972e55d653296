"""One scan (+ its label map) -> oriented, resampled, cropped int16 HU volume and anatomy boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage

from ctray.errors import BadInput
from ctray.ingest.config import PreprocessConfig
from ctray.ingest.volume import RawVolume
from ctray.resample import grid_affine, resample_linear, resample_nearest, spacing_maps, spacing_shape

# Mask and scan grids are the same when their affines agree to this many mm.
_GRID_TOL_MM = 1e-2


@dataclass
class Preprocessed:
    hu: np.ndarray
    """int16 HU, (z, y, x) in the configured orientation, C-contiguous."""
    labels: np.ndarray | None
    """uint8 TotalSegmentator ids on the same grid, or None without a mask."""
    affine: np.ndarray
    """voxel -> RAS (mm) of the stored grid."""
    spacing: tuple[float, float, float]
    """Voxel size (mm) along the stored axes."""


def orient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip axes to `axcodes` (nibabel convention). Returns a view and its affine."""
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    transform = nib.orientations.ornt_transform(current, target)
    view = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return view, new_affine


def check_intensity(scan: RawVolume, cfg: PreprocessConfig) -> None:
    lo, hi = scan.value_range()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise BadInput(f"{scan.source}: image holds NaN or infinite voxels")
    if lo > cfg.min_hu_required or hi > cfg.max_hu_allowed:
        raise BadInput(
            f"{scan.source}: intensity range {lo:.0f}..{hi:.0f} is not CT in HU "
            f"(needs min <= {cfg.min_hu_required:.0f} and max <= {cfg.max_hu_allowed:.0f})"
        )


def mask_labels(mask: RawVolume, scan_shape: tuple[int, ...], scan_affine: np.ndarray, axcodes: str) -> np.ndarray:
    """The mask oriented like the scan (given oriented), as uint8 ids, after checking both lie on one
    voxel grid. Comparing in the oriented space accepts a mask stored in another axis order (a
    DICOM series and its NIfTI label map) but never a different grid."""
    data, affine = orient(mask.data, mask.affine, axcodes)
    if data.shape != scan_shape:
        raise BadInput(f"{mask.source}: grid {tuple(data.shape)} differs from its scan's {tuple(scan_shape)}")
    if not np.allclose(affine, scan_affine, atol=_GRID_TOL_MM):
        raise BadInput(f"{mask.source}: affine differs from its scan's (not the same voxel grid)")
    if data.dtype == np.uint8 and mask.slope == 1.0 and mask.inter == 0.0:
        return data
    lo, hi = mask.value_range()
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise BadInput(f"{mask.source}: label values {lo}..{hi} are not TotalSegmentator ids (0..255)")
    return np.rint(data * mask.slope + mask.inter).astype(np.uint8)


def check_resampled_size(source: str, shape: tuple[int, ...], spacing: np.ndarray, cfg: PreprocessConfig) -> None:
    """Refuse a scan whose resampled grid holds more than preprocess.max_voxels, before any of it
    is allocated. The input's check (its header) bounds the input only: a header with pixdim 100x
    too large turns a few thousand voxels into tens of billions at the target spacing, which would
    cost the worker its memory (writer_memory counts on the output being no larger than the limit)."""
    out = spacing_shape(shape, spacing, cfg.spacing)
    voxels = math.prod(out)
    if voxels > cfg.max_voxels:
        mm = "x".join(f"{s:g}" for s in spacing)
        raise BadInput(
            f"{source}: {'x'.join(map(str, shape))} voxels of {mm} mm resample to"
            f" {'x'.join(map(str, out))} = {voxels} voxels at {'x'.join(f'{s:g}' for s in cfg.spacing)} mm,"
            f" more than preprocess.max_voxels={cfg.max_voxels}"
        )


def preprocess(scan: RawVolume, mask: RawVolume | None, cfg: PreprocessConfig) -> Preprocessed:
    data, affine = orient(scan.data, scan.affine, cfg.orientation)  # a view: nothing allocated yet
    check_resampled_size(scan.source, data.shape, voxel_sizes(affine), cfg)
    check_intensity(scan, cfg)
    labels_src = mask_labels(mask, data.shape, affine, cfg.orientation) if mask is not None else None
    maps = spacing_maps(data.shape, voxel_sizes(affine), cfg.spacing)
    hu = resample_linear(data, maps, scan.slope, scan.inter)
    out_affine = grid_affine(affine, maps)
    labels = None
    if labels_src is not None:
        labels = resample_nearest(labels_src, maps)

    if cfg.crop_foreground:
        box = foreground_box(hu, cfg.foreground_hu)
        if box is None:
            raise BadInput(f"{scan.source}: no voxel above foreground_hu={cfg.foreground_hu:.0f}; nothing to keep")
        hu = np.ascontiguousarray(hu[box])
        labels = np.ascontiguousarray(labels[box]) if labels is not None else None
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in box]
        out_affine = out_affine @ shift
    sz, sy, sx = voxel_sizes(out_affine)
    return Preprocessed(hu, labels, out_affine, (float(sz), float(sy), float(sx)))


def foreground_box(hu: np.ndarray, threshold: float) -> tuple[slice, slice, slice] | None:
    fg = hu > threshold
    box = []
    for axis in range(3):
        hits = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    z, y, x = box
    return z, y, x


def anatomy_boxes(labels: np.ndarray, groups: dict[str, list[int]]) -> list[dict]:
    """Per anatomy present: its bounding box [z0, y0, x0, z1, y1, x1] (half-open) and voxel count.

    One scipy find_objects pass gives every label's box; an anatomy's box is the union of its
    classes' boxes, and its count sums each class inside its own box.
    """
    objects = ndimage.find_objects(labels)
    out = []
    for anatomy, ids in groups.items():
        boxes, voxels = [], 0
        for i in ids:
            if i <= len(objects) and objects[i - 1] is not None:
                sl = objects[i - 1]
                boxes.append(sl)
                voxels += int(np.count_nonzero(labels[sl] == i))
        if not boxes:
            continue
        lo = [min(b[a].start for b in boxes) for a in range(3)]
        hi = [max(b[a].stop for b in boxes) for a in range(3)]
        out.append({"anatomy": anatomy, "box": lo + hi, "voxels": voxels})
    return out
