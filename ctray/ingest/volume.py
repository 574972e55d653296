"""Read NIfTI files without converting them to float (DICOM series: dicom.py).

A reader returns the stored integers (or floats) plus the scaling to HU, so that ingest can
check, orient and resample the scan slice by slice (see resample.py for why).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from typing import cast

import nibabel as nib
import numpy as np

from ctray.errors import BadInput, library_error


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


def load_nifti(path: str, source: str, max_voxels: int | None = None, quote_errors: bool = True) -> RawVolume:
    """Load a .nii/.nii.gz without scaling, after checking the header against `max_voxels` and
    the file against the header, so that a lying header costs nothing. `source` names the input in
    errors; `quote_errors` False keeps the reader's own messages (which quote `path`) out of them.

    An uncompressed file is memory-mapped once its size covers the voxels. A compressed one is
    inflated chunk by chunk into an array that is allocated but not touched beforehand (the pages
    are only committed as data arrives), so a truncated file fails after committing what it holds,
    not what its header claims (nibabel's own reader zero-fills a buffer of the full size first).
    """
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for a bad header
        raise BadInput(f"{source}: not a readable NIfTI file ({library_error(e, quote_errors)})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInput(f"{source}: {type(img).__name__} is not a NIfTI image")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) not in (3, 4, 5):
        raise BadInput(f"{source}: {len(shape)}D image of shape {shape}; expected one 3D volume")
    voxels = int(np.prod(shape, dtype=np.int64))
    if max_voxels is not None and voxels > max_voxels:
        raise BadInput(
            f"{source}: header claims {'x'.join(map(str, shape))} = {voxels} voxels,"
            f" more than preprocess.max_voxels={max_voxels}"
        )
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise BadInput(f"{source}: voxel type {dtype} is not a scalar number")
    offset = int(img.dataobj.offset)
    nbytes = voxels * dtype.itemsize
    gz = gzip_reader()
    unreadable: tuple[type[Exception], ...] = (EOFError, zlib.error, OSError, ValueError, *gz.errors)
    try:
        if path.endswith(".gz"):
            data = _inflate(gz, path, offset, shape, dtype, source)
        else:
            size = os.path.getsize(path)
            if size < offset + nbytes:
                raise BadInput(f"{source}: truncated image data ({size - offset} of {nbytes} bytes)")
            data = np.asanyarray(img.dataobj.get_unscaled())
    except unreadable as e:
        raise BadInput(f"{source}: truncated or corrupt image data ({library_error(e, quote_errors)})") from e
    data = _as_3d(data, source)
    slope = float(img.dataobj.slope)
    inter = float(img.dataobj.inter)
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise BadInput(f"{source}: missing or degenerate affine in the NIfTI header")
    return RawVolume(data, np.asarray(affine, dtype=np.float64), slope, inter, source)


@dataclass(frozen=True)
class GzipReader:
    """How ingest inflates .nii.gz: a GzipFile class and what its reader raises on a corrupt stream
    besides EOFError and OSError (gzip.BadGzipFile: a bad header, CRC or length)."""

    name: str
    """The inflater and its version, for benchmarks and logs."""
    file: type[gzip.GzipFile]
    errors: tuple[type[Exception], ...]


def gzip_reader() -> GzipReader:
    """isal's igzip where it is installed, else the standard library's gzip (zlib).

    isal (PSF-2.0 licence, https://github.com/pycompression/python-isal) binds Intel's ISA-L
    (BSD-3-Clause), whose inflate returns the same bytes as zlib's in about 40% of its CPU time: a
    77 MiB .nii.gz of a 512x512x300 scan takes 0.34 s on one core against zlib's 0.82 s, which was 80%
    of ingest's time per scan. isal 1.7.2 has wheels for CPython 3.8-3.13 on Linux x86-64 and aarch64
    (glibc and musl), macOS and Windows; pyproject.toml asks for it on those machines only, and where
    it is missing zlib inflates the same bytes.
    """
    try:
        from isal import __version__, igzip, isal_zlib
    except ImportError:
        return GzipReader(f"zlib {zlib.ZLIB_RUNTIME_VERSION}", gzip.GzipFile, (zlib.error,))
    # isal's stubs declare its error an instance; it is the class IsalError.
    return GzipReader(f"isal {__version__} (ISA-L)", igzip.IGzipFile, (cast(type[Exception], isal_zlib.error),))


_CHUNK = 16 << 20


def _inflate(
    gz: GzipReader, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, source: str
) -> np.ndarray:
    """The voxels of a .nii.gz, read into an untouched np.empty in 16 MiB chunks (NIfTI is
    Fortran-ordered). The rest of the stream is then read and dropped, so that the gzip trailer's
    CRC and length are checked: a corrupt stream can inflate to as many bytes as the header asks for,
    wrong ones (junk after the stream fails the same way)."""
    data = np.empty(shape, dtype=dtype, order="F")
    # numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; arrays are buffers on 3.11 too.
    view = memoryview(data.reshape(-1, order="A").view(np.uint8))  # type: ignore[arg-type]
    with gz.file(path, "rb") as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done : done + _CHUNK])
            if not n:
                raise BadInput(f"{source}: truncated image data ({done} of {len(view)} bytes)")
            done += n
        while f.read(_CHUNK):  # bytes past the voxels (none in a NIfTI file written by the book)
            pass
    return data
