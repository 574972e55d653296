"""Read NIfTI files and DICOM series without converting them to float.

A reader returns the stored integers (or floats) plus the scaling to HU, so that ingest can
check, orient and resample the scan slice by slice (see resample.py for why).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from ctray.errors import BadInput


@dataclass
class RawVolume:
    """A 3D image as stored: values, voxel->RAS affine (mm) and the linear map to HU."""

    data: np.ndarray
    """Stored values, 3D, in the file's own axis order (possibly a memory map or a view)."""
    affine: np.ndarray
    """4x4 voxel index -> RAS+ world (mm), nibabel convention."""
    slope: float = 1.0
    inter: float = 0.0
    source: str = ""
    """Name of the input in errors and records."""

    def value_range(self) -> tuple[float, float]:
        """Min and max after scaling (NaN or inf when the data holds them)."""
        lo, hi = float(np.min(self.data)), float(np.max(self.data))
        a, b = lo * self.slope + self.inter, hi * self.slope + self.inter
        return (min(a, b), max(a, b))


def _as_3d(data: np.ndarray, source: str) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 5 and data.shape[3:] == (1, 1):
        data = data[..., 0, 0]
    if data.ndim != 3:
        raise BadInput(f"{source}: {data.ndim}D image of shape {tuple(data.shape)}; expected one 3D volume")
    if min(data.shape) < 2:
        raise BadInput(f"{source}: 2D image (shape {tuple(data.shape)}); expected a 3D volume")
    return data


def load_nifti(path: str, source: str) -> RawVolume:
    """Load a .nii/.nii.gz without scaling (memory-mapped when uncompressed)."""
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for a bad header
        raise BadInput(f"{source}: not a readable NIfTI file ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInput(f"{source}: {type(img).__name__} is not a NIfTI image")
    if len(img.shape) not in (3, 4, 5):
        raise BadInput(f"{source}: {len(img.shape)}D image of shape {img.shape}; expected one 3D volume")
    try:
        data = np.asanyarray(img.dataobj.get_unscaled())
    except (EOFError, zlib.error, OSError, ValueError) as e:
        raise BadInput(f"{source}: truncated or corrupt image data ({type(e).__name__}: {_first_line(e)})") from e
    data = _as_3d(data, source)
    slope = float(img.dataobj.slope)
    inter = float(img.dataobj.inter)
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise BadInput(f"{source}: missing or degenerate affine in the NIfTI header")
    return RawVolume(data, np.asarray(affine, dtype=np.float64), slope, inter, source)


def load_dicom_series(paths: list[str], source: str) -> RawVolume:
    """Stack one DICOM series (one file per slice), sorted along the slice normal."""
    import pydicom

    slices = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p)
            if "PixelData" not in ds:
                continue
            slices.append(ds)
        except Exception as e:
            raise BadInput(f"{source}: unreadable DICOM file {p.rsplit('/', 1)[-1]} ({type(e).__name__}: {_first_line(e)})") from e
    if len(slices) < 2:
        raise BadInput(f"{source}: DICOM series with {len(slices)} image slice(s); expected a 3D volume")
    try:
        row_dir, col_dir = np.split(np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64), 2)
        normal = np.cross(row_dir, col_dir)
        slices.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
        positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in slices])
        dr, dc = (float(v) for v in slices[0].PixelSpacing)
        data = np.stack([ds.pixel_array for ds in slices])
        slopes = {float(getattr(ds, "RescaleSlope", 1.0)) for ds in slices}
        inters = {float(getattr(ds, "RescaleIntercept", 0.0)) for ds in slices}
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{source}: inconsistent DICOM series ({type(e).__name__}: {_first_line(e)})") from e
    if len(slopes) > 1 or len(inters) > 1:
        raise BadInput(f"{source}: DICOM slices disagree on RescaleSlope/RescaleIntercept")
    steps = np.diff(positions @ normal)
    if np.any(steps <= 1e-6):
        raise BadInput(f"{source}: DICOM series has duplicate slice positions")
    dz = float(np.median(steps))
    # DICOM patient space is LPS; the affine is RAS like nibabel's. Array axes: (slice, row, col).
    lps = np.eye(4)
    lps[:3, 0] = normal * dz
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = row_dir * dc
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return RawVolume(_as_3d(data, source), affine, slopes.pop(), inters.pop(), source)


def _first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0][:200] if text else ""
