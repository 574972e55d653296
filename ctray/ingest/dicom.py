"""DICOM as hospitals export it: recognised by content, split into series, checked, decoded.

Two steps, both run in Ray tasks on the cluster (never on the driver):
- `probe_folder`: read the header of every file of one folder (no pixel data). Files without the
  DICM preamble are not images; DICOM files without pixel data (DICOMDIR, reports) and series that
  are not axial CT (localizers, scouts, reformats, other modalities) are skipped with a reason;
  the rest are grouped by SeriesInstanceUID, and a series too large to read is quarantined.
- `load_series`: read one series' pixel data (any transfer syntax the declared decoders handle:
  JPEG 2000, JPEG-LS, JPEG lossless and baseline through python-gdcm or pylibjpeg, RLE and the
  uncompressed ones through pydicom), after checking its geometry: slices on one grid, uniform
  slice steps (a missing slice would otherwise be squeezed out) and no gantry tilt.

Identifying tags (PatientName, PatientID, ...) are never read into anything that leaves this
module; errors name the input, the check and the measured figures, never a tag's value, and
pydicom's own warnings (which quote values) are silenced.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from ctray.errors import BadInput
from ctray.ingest.config import DicomConfig
from ctray.ingest.volume import RawVolume

_PROBE_TAGS = [
    "SeriesInstanceUID", "Modality", "ImageType", "ImageOrientationPatient", "ImagePositionPatient",
    "Rows", "Columns", "NumberOfFrames", "SeriesNumber",
]
PREAMBLE_BYTES = 132


def is_dicom_preamble(head: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever they are named."""
    return len(head) >= PREAMBLE_BYTES and head[128:132] == b"DICM"


@contextlib.contextmanager
def quiet_pydicom():
    """pydicom warns (and logs) about invalid values by quoting them; a value may be a name."""
    import pydicom.config

    logger = logging.getLogger("pydicom")
    level, mode = logger.level, pydicom.config.settings.reading_validation_mode
    logger.setLevel(logging.CRITICAL)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        pydicom.config.settings.reading_validation_mode = mode


@dataclass
class Series:
    """One image series found in a folder."""

    uid: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    columns: int = 0


@dataclass
class Probe:
    """What one folder holds: series to ingest, and (file or series, reason) for the rest."""

    series: list[Series]
    skipped: list[tuple[str, str]]
    """(input, why): a file that is not an image or holds no pixel data, or a series
    (`<folder> (series <uid>)`) that is not axial CT. `why` does not repeat the input's name."""
    quarantined: list[tuple[str, list[str], str]]
    """(series uid, files, why): axial CT series that cannot be read (too large)."""


def _floats(value, n: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _oblique_deg(iop: np.ndarray) -> float:
    """Angle between the slice normal and the patient's head-foot (z) axis."""
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    return 90.0 if norm < 1e-6 else math.degrees(math.acos(min(1.0, abs(normal[2]) / norm)))


def probe_folder(headers: list[tuple[str, bytes | None, object]], folder_uri: str, cfg: DicomConfig, max_voxels: int) -> Probe:
    """Classify one folder's files. `headers` holds (uri, first bytes, open()-able) per file; only
    files with the DICM preamble are parsed, and only their headers (stop_before_pixels)."""
    import pydicom

    by_uid: dict[str, Series] = {}
    meta: dict[str, dict] = {}
    skipped: list[tuple[str, str]] = []
    headless: list[tuple[str, str]] = []
    with quiet_pydicom():
        for uri, head, opener in headers:
            if head is None or not is_dicom_preamble(head):
                skipped.append((uri, "not an image (neither NIfTI by name nor DICOM by content)"))
                continue
            try:
                with opener() as f:
                    ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_PROBE_TAGS)
                uid = str(ds.get("SeriesInstanceUID", "") or "")
                if "Rows" not in ds:  # no image header: a DICOMDIR, a report, or a slice cut short
                    headless.append((uri, uid))
                    continue
                rows, columns = int(ds.Rows), int(ds.get("Columns", 0) or 0)
                types = {str(t).upper() for t in (ds.get("ImageType") or [])}
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                modality = str(ds.get("Modality", "") or "")
                iop = _floats(ds.get("ImageOrientationPatient") or [], 6)
            except Exception as e:  # noqa: BLE001 - any header that does not parse: the file is reported, not fatal
                skipped.append((uri, f"unreadable DICOM header ({type(e).__name__})"))
                continue
            s = by_uid.setdefault(uid, Series(uid))
            s.files.append(uri)
            s.rows, s.columns = rows, columns
            m = meta.setdefault(uid, {"modality": modality, "types": set(), "iop": None, "frames": 1})
            m["types"] |= types
            m["iop"] = iop if m["iop"] is None else m["iop"]
            m["frames"] = max(m["frames"], frames)
    for uri, uid in headless:
        if uid in by_uid:  # a member of an image series without its image header: reading it reports the damage
            by_uid[uid].files.append(uri)
        else:
            skipped.append((uri, "DICOM without image data (a DICOMDIR, report or structure set)"))
    series, quarantined = [], []
    for uid, s in sorted(by_uid.items()):
        m = meta[uid]
        why = None
        if m["modality"] != "CT":
            why = f"modality {m['modality'] or 'unknown'}, not CT"
        elif m["types"] & {"LOCALIZER", "SCOUT", "TOPOGRAM"}:
            why = f"a localizer/scout series of {len(s.files)} image(s), not a volume"
        elif m["frames"] > 1:
            why = f"multi-frame (enhanced) DICOM of {m['frames']} frames is not supported; export single-frame slices"
        elif m["iop"] is None:
            why = "no usable ImageOrientationPatient"
        elif (angle := _oblique_deg(m["iop"])) > cfg.max_oblique_deg:
            why = f"not axial (slice normal {angle:.0f} deg from the head-foot axis; a reformat?)"
        if why:
            skipped.append((f"{folder_uri} (series {uid})", why))
            continue
        s.files.sort()
        voxels = len(s.files) * s.rows * s.columns
        if len(s.files) > cfg.max_slices:
            quarantined.append((uid, s.files, f"{len(s.files)} slices, more than input.dicom.max_slices={cfg.max_slices}"))
        elif voxels > max_voxels:
            quarantined.append((uid, s.files, f"{len(s.files)}x{s.rows}x{s.columns} = {voxels} voxels, more than preprocess.max_voxels={max_voxels}"))
        else:
            series.append(s)
    return Probe(series, skipped, quarantined)


def load_series(paths: list[str], label: str, cfg: DicomConfig) -> RawVolume:
    """Stack one DICOM series (one local file per slice) along its slice normal, after checking
    that it is one regular volume."""
    import pydicom

    slices = []
    with quiet_pydicom():
        for i, p in enumerate(paths):
            try:
                ds = pydicom.dcmread(p, defer_size="1 KB")
            except Exception as e:  # noqa: BLE001
                raise BadInput(f"{label}: file {i + 1} of {len(paths)} (by name) is not readable DICOM ({type(e).__name__})") from None
            if "PixelData" not in ds:  # the probe saw an image header: the file was cut short
                raise BadInput(f"{label}: file {i + 1} of {len(paths)} (by name) has an image header but no pixel data (truncated?)")
            slices.append(ds)
        if len(slices) < 2:
            raise BadInput(f"{label}: DICOM series with {len(slices)} image slice(s); expected a 3D volume")
        order, affine = _geometry(slices, label, cfg)
        scaling = {(_scalar(ds, "RescaleSlope", 1.0), _scalar(ds, "RescaleIntercept", 0.0)) for ds in slices}
        if None in {v for pair in scaling for v in pair}:
            raise BadInput(f"{label}: a slice has an unusable RescaleSlope or RescaleIntercept")
        if len(scaling) > 1:
            raise BadInput(f"{label}: DICOM slices disagree on RescaleSlope/RescaleIntercept")
        (slope, inter), = scaling
        rows, cols = int(slices[0].Rows), int(slices[0].Columns)
        data = None
        for k, i in enumerate(order):
            try:
                pixels = slices[i].pixel_array
            except Exception as e:  # noqa: BLE001 - keep to the type: a message may quote a header value
                syntax = getattr(getattr(slices[i], "file_meta", None), "TransferSyntaxUID", None)
                what = getattr(syntax, "name", "unknown transfer syntax")
                raise BadInput(f"{label}: pixel data of slice {k + 1} ({what}) cannot be decoded ({type(e).__name__})") from None
            if pixels.shape != (rows, cols):
                raise BadInput(f"{label}: slice {k + 1} decodes to {pixels.shape}, not {rows}x{cols}")
            if data is None:  # one allocation, filled slice by slice (np.stack would hold two copies)
                data = np.empty((len(order), rows, cols), dtype=pixels.dtype)
            data[k] = pixels
            slices[i] = None  # the decoded slice is in `data`; let the dataset and its encoded bytes go
    return RawVolume(data, affine, slope, inter, label)


def _scalar(ds, keyword: str, default: float) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    out = _floats([value], 1)
    return None if out is None else float(out[0])


def _geometry(slices: list, label: str, cfg: DicomConfig) -> tuple[list[int], np.ndarray]:
    """Slice order along the normal and the RAS affine, or BadInput with the measured figures."""
    iops = [_floats(ds.get("ImageOrientationPatient") or [], 6) for ds in slices]
    positions = [_floats(ds.get("ImagePositionPatient") or [], 3) for ds in slices]
    spacings = [_floats(ds.get("PixelSpacing") or [], 2) for ds in slices]
    if any(v is None for v in iops + positions + spacings):
        raise BadInput(f"{label}: a slice lacks a usable ImageOrientationPatient, ImagePositionPatient or PixelSpacing")
    if any(not np.allclose(v, iops[0], atol=1e-4) for v in iops):
        raise BadInput(f"{label}: slices disagree on ImageOrientationPatient (mixed orientations in one series)")
    if any(not np.allclose(v, spacings[0], atol=1e-4) for v in spacings):
        raise BadInput(f"{label}: slices disagree on PixelSpacing")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
    if len(sizes) > 1:
        raise BadInput(f"{label}: slices of different sizes {sorted(sizes)}")
    row_dir, col_dir = iops[0][:3], iops[0][3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5 or abs(float(row_dir @ col_dir)) > 1e-3:
        raise BadInput(f"{label}: ImageOrientationPatient does not hold two perpendicular unit directions")
    normal /= np.linalg.norm(normal)
    pos = np.stack(positions)
    along = pos @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    steps = np.diff(along[order])
    if np.any(steps <= 1e-6):
        raise BadInput(f"{label}: DICOM series has duplicate slice positions")
    median = float(np.median(steps))
    worst = float(np.max(np.abs(steps - median)))
    if worst > cfg.spacing_tolerance * median:
        raise BadInput(
            f"{label}: non-uniform slice spacing, steps {float(steps.min()):.3g}..{float(steps.max()):.3g} mm "
            f"(median {median:.3g} mm; a missing slice?), beyond input.dicom.spacing_tolerance={cfg.spacing_tolerance}"
        )
    stack = pos[order[-1]] - pos[order[0]]
    tilt = math.degrees(math.acos(min(1.0, abs(float(stack @ normal)) / float(np.linalg.norm(stack)))))
    if tilt > cfg.max_tilt_deg:
        raise BadInput(f"{label}: gantry tilt of {tilt:.1f} deg (slice stack vs slice normal), beyond input.dicom.max_tilt_deg={cfg.max_tilt_deg}")
    dr, dc = (float(v) for v in spacings[0])
    # DICOM patient space is LPS; the affine is RAS like nibabel's. Array axes: (slice, row, col).
    lps = np.eye(4)
    lps[:3, 0] = normal * median
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = row_dir * dc
    lps[:3, 3] = pos[order[0]]
    return order, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def series_ids(folder_id: str, series: list[Series]) -> dict[str, str]:
    """Scan id of each series: the folder's id when it holds one series, else `<folder>/<uid>`."""
    if len(series) == 1:
        return {series[0].uid: folder_id}
    return {s.uid: f"{folder_id}/{s.uid}" for s in series}
