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
module, but for the one tag ingest's `groups.dicom` names (PatientID or StudyInstanceUID), which
the probe returns as the series' group for the driver to pseudonymise; errors name the input, the
check and the measured figures, never a tag's value, and pydicom's own warnings (which quote
values) are silenced.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from ctray.errors import BadInput
from ctray.ingest.config import DicomConfig
from ctray.ingest.volume import RawVolume

_PROBE_TAGS = [
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SeriesNumber",
]
PREAMBLE_BYTES = 132


def is_dicom_preamble(head: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever they are named."""
    return len(head) >= PREAMBLE_BYTES and head[128:132] == b"DICM"


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
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
    group: str | None = None
    """The value of the grouping tag (`probe_folder`'s group_tag) its files agree on; None: not
    read, absent, or files that disagree. Never logged or put in a reason."""


@dataclass
class Probe:
    """What one folder holds: series to ingest, and (file or series, reason) for the rest."""

    series: list[Series]
    skipped: list[tuple[str, str]]
    """(input, why): a file that is not an image or holds no pixel data, or a series
    (`<folder> (series <uid>)`) that is not axial CT. `why` does not repeat the input's name."""
    quarantined: list[tuple[str, list[str], str]]
    """(series uid, files, why): axial CT series that cannot be read (too large)."""


def _floats(value: Any, n: int) -> np.ndarray | None:
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


Opener = Callable[[], AbstractContextManager[IO[bytes]]]
"""Opens one file for reading (the probe reads only its header)."""


def probe_folder(
    headers: Sequence[tuple[str, bytes | None, Opener]],
    folder_uri: str,
    cfg: DicomConfig,
    max_voxels: int,
    group_tag: str | None = None,
) -> Probe:
    """Classify one folder's files. `headers` holds (uri, first bytes, open()-able) per file; only
    files with the DICM preamble are parsed, and only their headers (stop_before_pixels).
    `group_tag` (PatientID or StudyInstanceUID): also read that tag, as each series' group."""
    by_uid, meta, skipped = _group_by_series(headers, group_tag)
    series, quarantined = [], []
    for uid, s in sorted(by_uid.items()):
        why = _not_axial_ct(meta[uid], len(s.files), cfg)
        if why is not None:
            skipped.append((f"{folder_uri} (series {uid})", why))
            continue
        s.files.sort()
        s.group = next(iter(meta[uid].groups)) if len(meta[uid].groups) == 1 else None
        why = _too_large(s, cfg, max_voxels)
        if why is not None:
            quarantined.append((uid, s.files, why))
        else:
            series.append(s)
    return Probe(series, skipped, quarantined)


@dataclass
class _Header:
    """The tags of one file that group and classify it; `rows` is None when it has no image header."""

    uid: str
    rows: int | None = None
    columns: int = 0
    modality: str = ""
    types: set[str] = field(default_factory=set)
    frames: int = 1
    iop: np.ndarray | None = None
    group: str = ""
    """The grouping tag's value ("": not read or empty)."""


@dataclass
class _SeriesMeta:
    """What classifies a series, gathered over its files."""

    modality: str
    """As the first file says."""
    types: set[str] = field(default_factory=set)
    iop: np.ndarray | None = None
    """The first usable ImageOrientationPatient."""
    frames: int = 1
    groups: set[str] = field(default_factory=set)
    """The grouping tag's values over its files (empty ones left out)."""

    def add(self, h: _Header) -> None:
        self.groups |= {h.group} if h.group else set()
        self.types |= h.types
        self.iop = h.iop if self.iop is None else self.iop
        self.frames = max(self.frames, h.frames)


def _group_by_series(
    headers: Sequence[tuple[str, bytes | None, Opener]], group_tag: str | None
) -> tuple[dict[str, Series], dict[str, _SeriesMeta], list[tuple[str, str]]]:
    """The image series by SeriesInstanceUID and what classifies each, and (file, why) for the files
    that belong to none."""
    by_uid: dict[str, Series] = {}
    meta: dict[str, _SeriesMeta] = {}
    skipped: list[tuple[str, str]] = []
    headless: list[tuple[str, str]] = []
    with quiet_pydicom():
        for uri, head, opener in headers:
            if head is None or not is_dicom_preamble(head):
                skipped.append((uri, "not an image (neither NIfTI by name nor DICOM by content)"))
                continue
            try:
                h = _read_header(opener, group_tag)
            except Exception as e:  # any header that does not parse: the file is reported, not fatal
                skipped.append((uri, f"unreadable DICOM header ({type(e).__name__})"))
                continue
            if h.rows is None:
                headless.append((uri, h.uid))
                continue
            s = by_uid.setdefault(h.uid, Series(h.uid))
            s.files.append(uri)
            s.rows, s.columns = h.rows, h.columns
            meta.setdefault(h.uid, _SeriesMeta(h.modality)).add(h)
    for uri, uid in headless:
        if uid in by_uid:  # a member of an image series without its image header: reading it reports the damage
            by_uid[uid].files.append(uri)
        else:
            skipped.append((uri, "DICOM without image data (a DICOMDIR, report or structure set)"))
    return by_uid, meta, skipped


def _read_header(opener: Opener, group_tag: str | None = None) -> _Header:
    """Call within quiet_pydicom(): pydicom converts (and may warn about) values as they are read."""
    import pydicom

    tags = _PROBE_TAGS if group_tag is None else [*_PROBE_TAGS, group_tag]
    with opener() as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if "Rows" not in ds:  # no image header: a DICOMDIR, a report, or a slice cut short
        return _Header(uid)
    rows, columns = int(ds.Rows), int(ds.get("Columns", 0) or 0)
    types = {str(t).upper() for t in (ds.get("ImageType") or [])}
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    modality = str(ds.get("Modality", "") or "")
    iop = _floats(ds.get("ImageOrientationPatient") or [], 6)
    group = str(ds.get(group_tag, "") or "").strip() if group_tag else ""
    return _Header(uid, rows, columns, modality, types, frames, iop, group)


def _not_axial_ct(m: _SeriesMeta, n_files: int, cfg: DicomConfig) -> str | None:
    """Why a series is not an axial CT volume, or None when it is one."""
    if m.modality != "CT":
        return f"modality {m.modality or 'unknown'}, not CT"
    if m.types & {"LOCALIZER", "SCOUT", "TOPOGRAM"}:
        return f"a localizer/scout series of {n_files} image(s), not a volume"
    if m.frames > 1:
        return f"multi-frame (enhanced) DICOM of {m.frames} frames is not supported; export single-frame slices"
    if m.iop is None:
        return "no usable ImageOrientationPatient"
    angle = _oblique_deg(m.iop)
    if angle > cfg.max_oblique_deg:
        return f"not axial (slice normal {angle:.0f} deg from the head-foot axis; a reformat?)"
    return None


def _too_large(s: Series, cfg: DicomConfig, max_voxels: int) -> str | None:
    """Why an axial CT series is too large to read, or None."""
    n = len(s.files)
    if n > cfg.max_slices:
        return f"{n} slices, more than input.dicom.max_slices={cfg.max_slices}"
    voxels = n * s.rows * s.columns
    if voxels > max_voxels:
        return f"{n}x{s.rows}x{s.columns} = {voxels} voxels, more than preprocess.max_voxels={max_voxels}"
    return None


def load_series(paths: list[str], label: str, cfg: DicomConfig) -> RawVolume:
    """Stack one DICOM series (one local file per slice) along its slice normal, after checking
    that it is one regular volume."""
    import pydicom

    slices: list[Any] = []
    with quiet_pydicom():
        for i, p in enumerate(paths):
            try:
                ds = pydicom.dcmread(p, defer_size="1 KB")
            except Exception as e:  # named by type only: a message may quote a header value
                raise BadInput(
                    f"{label}: file {i + 1} of {len(paths)} (by name) is not readable DICOM ({type(e).__name__})"
                ) from None
            if "PixelData" not in ds:  # the probe saw an image header: the file was cut short
                raise BadInput(
                    f"{label}: file {i + 1} of {len(paths)} (by name) has an image header but no pixel data"
                    " (truncated?)"
                )
            slices.append(ds)
        if len(slices) < 2:
            raise BadInput(f"{label}: DICOM series with {len(slices)} image slice(s); expected a 3D volume")
        order, affine = _geometry(slices, label, cfg)
        scaling = {(_scalar(ds, "RescaleSlope", 1.0), _scalar(ds, "RescaleIntercept", 0.0)) for ds in slices}
        usable = {(slope, inter) for slope, inter in scaling if slope is not None and inter is not None}
        if len(usable) < len(scaling):
            raise BadInput(f"{label}: a slice has an unusable RescaleSlope or RescaleIntercept")
        if len(usable) > 1:
            raise BadInput(f"{label}: DICOM slices disagree on RescaleSlope/RescaleIntercept")
        ((slope, inter),) = usable
        rows, cols = int(slices[0].Rows), int(slices[0].Columns)
        data: np.ndarray | None = None
        for k, i in enumerate(order):
            try:
                pixels = slices[i].pixel_array
            except Exception as e:  # keep to the type: a message may quote a header value
                syntax = getattr(getattr(slices[i], "file_meta", None), "TransferSyntaxUID", None)
                what = getattr(syntax, "name", "unknown transfer syntax")
                raise BadInput(
                    f"{label}: pixel data of slice {k + 1} ({what}) cannot be decoded ({type(e).__name__})"
                ) from None
            if pixels.shape != (rows, cols):
                raise BadInput(f"{label}: slice {k + 1} decodes to {pixels.shape}, not {rows}x{cols}")
            if data is None:  # one allocation, filled slice by slice (np.stack would hold two copies)
                data = np.empty((len(order), rows, cols), dtype=pixels.dtype)
            data[k] = pixels
            slices[i] = None  # the decoded slice is in `data`; let the dataset and its encoded bytes go
    if data is None:  # cannot happen past the two-slice check; keeps the error clear if that ever changes
        raise BadInput(f"{label}: DICOM series without image slices")
    return RawVolume(data, affine, slope, inter, label)


def _scalar(ds: Any, keyword: str, default: float) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    out = _floats([value], 1)
    return None if out is None else float(out[0])


def _all_floats(slices: list[Any], keyword: str, n: int) -> list[np.ndarray] | None:
    """`keyword` of every slice as `n` finite floats, or None when a slice lacks a usable value."""
    values = [_floats(ds.get(keyword) or [], n) for ds in slices]
    usable = [v for v in values if v is not None]
    return usable if len(usable) == len(values) else None


def _geometry(slices: list[Any], label: str, cfg: DicomConfig) -> tuple[list[int], np.ndarray]:
    """Slice order along the normal and the RAS affine, or BadInput with the measured figures."""
    iops = _all_floats(slices, "ImageOrientationPatient", 6)
    positions = _all_floats(slices, "ImagePositionPatient", 3)
    spacings = _all_floats(slices, "PixelSpacing", 2)
    if iops is None or positions is None or spacings is None:
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
        raise BadInput(
            f"{label}: gantry tilt of {tilt:.1f} deg (slice stack vs slice normal),"
            f" beyond input.dicom.max_tilt_deg={cfg.max_tilt_deg}"
        )
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
