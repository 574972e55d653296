"""Synthetic CT phantoms with TotalSegmentator label maps, known lesions and matching reports.

Used by the quickstart, the tests and the benchmarks. Geometry is defined in millimetres as
fractions of the field of view, so any shape and spacing (tiny test volumes up to 512x512x300 at
0.7x0.7x1 mm) gives the same anatomy. Volumes are built one axial slice at a time, so a clinical
size costs its own int16 array and no more.

Arrays are (z, y, x) in SPL orientation: z toward superior, y toward posterior, x toward the
patient's left. HU values: air -1000, lung -850, fat -100, soft tissue 40-60, bone 400-700.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from ctray.anatomy import CLASS_IDS
from ctray.anatomy import DEFAULT_FINDINGS as FINDINGS

_NORMAL = {
    "lung": ["The lungs are clear without nodules or consolidation.", "No pleural effusion is seen."],
    "heart": ["Heart size is normal.", "No pericardial effusion."],
    "aorta": ["The thoracic aorta has a normal caliber."],
    "liver": ["The liver is normal in size and attenuation."],
    "spleen": ["The spleen is normal in size."],
    "kidney": ["Both kidneys are unremarkable."],
    "bone": ["Bone structures are intact.", "Vertebral body heights are preserved."],
}
_ABNORMAL = {
    "lung_nodule": "A {d} mm solid nodule is seen in the {side} lung {lobe} lobe.",
    "cardiomegaly": "The heart is enlarged (cardiomegaly).",
    "aortic_dilation": "The descending aorta is dilated, measuring {d} mm.",
    "liver_lesion": "A {d} mm hypodense lesion is present in the liver.",
    "splenomegaly": "The spleen is enlarged (splenomegaly).",
    "kidney_cyst": "A {d} mm simple cyst is seen in the {side} kidney.",
    "bone_lesion": "A sclerotic lesion is noted in the {level} vertebral body.",
}
_VERTEBRA_LEVELS = [*(f"L{i}" for i in range(5, 0, -1)), *(f"T{i}" for i in range(12, 0, -1))]
"""Bottom to top."""


def report_prompts() -> dict[str, tuple[str, str]]:
    """Finding -> (present, absent) sentences in the phantoms' report wording, for zero-shot prompts."""
    example = {"d": 12, "side": "left", "lobe": "upper", "level": "L2"}
    return {f: (_ABNORMAL[f].format(**example), _NORMAL[anatomy][0]) for f, anatomy in FINDINGS.items()}


@dataclass
class Phantom:
    scan_id: str
    hu: np.ndarray
    """int16 HU, (z, y, x), SPL."""
    labels: np.ndarray
    """uint8 TotalSegmentator v2 "total" ids, same grid."""
    spacing: tuple[float, float, float]
    """mm along z, y, x."""
    findings: dict[str, int]
    """finding label -> 1 present / 0 absent."""
    sentences: dict[str, list[str]] = field(default_factory=dict)
    """anatomy -> report sentences (normal, or describing the lesion)."""

    @property
    def affine(self) -> np.ndarray:
        """voxel (z, y, x) -> RAS mm for the SPL array, origin at the volume's centre."""
        sz, sy, sx = self.spacing
        a = np.zeros((4, 4))
        a[0, 2], a[1, 1], a[2, 0], a[3, 3] = -sx, -sy, sz, 1.0
        a[:3, 3] = -a[:3, :3] @ (np.array(self.hu.shape) / 2.0)
        return a

    @property
    def report(self) -> str:
        return " ".join(s for a in _NORMAL for s in self.sentences.get(a, []))


class _Shape:
    """An ellipsoid (or a z-cylinder when rz is None) in mm, labelled and filled with one HU."""

    def __init__(
        self, label: int, hu: float, c: tuple[float, float, float], r: tuple[float | None, float, float]
    ) -> None:
        self.label, self.hu, self.c, self.r = label, hu, c, r

    def mask(self, z: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray | None:
        cz, cy, cx = self.c
        rz, ry, rx = self.r
        dz = 0.0 if rz is None else ((z - cz) / rz) ** 2
        if dz > 1.0:
            return None
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0 - dz


# Lungs are labelled per lobe while painting, so their shapes carry these placeholders instead of a class id.
_RIGHT_LUNG, _LEFT_LUNG = -1, -2


@dataclass
class _Geometry:
    """The field of view in mm: half-widths H (y) and W (x), length L (z), and the in-plane voxel
    centres every axial slice shares."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    H: float
    W: float
    L: float
    yy: np.ndarray
    """(ny, 1), posterior positive."""
    xx: np.ndarray
    """(1, nx), patient-left positive."""

    @classmethod
    def of(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Geometry:
        nz, ny, nx = shape
        sz, sy, sx = spacing
        H, W, L = ny * sy / 2, nx * sx / 2, nz * sz
        yy = ((np.arange(ny) + 0.5) * sy - H)[:, None]
        xx = ((np.arange(nx) + 0.5) * sx - W)[None, :]
        return cls(shape, spacing, H, W, L, yy, xx)

    @property
    def lung_c(self) -> float:
        """Height of the lungs' centre."""
        return 0.75 * self.L


def make_phantom(
    scan_id: str,
    seed: int,
    shape: tuple[int, int, int] = (48, 128, 128),
    spacing: tuple[float, float, float] = (3.0, 2.5, 2.5),
    lesion_rate: float = 0.5,
    noise_hu: float = 12.0,
) -> Phantom:
    """One phantom; each finding is present with probability `lesion_rate` (seeded)."""
    # The order of the random draws fixes each seed's phantom, which the tests rely on.
    rng = np.random.default_rng(seed)
    geo = _Geometry.of(shape, spacing)
    findings = {f: int(rng.random() < lesion_rate) for f in FINDINGS}
    organs = _organs(rng, findings, geo)
    lesions, sentences, bone_level = _lesions(rng, findings, geo)
    hu, labels = _render(geo, organs, lesions, bone_level, rng, noise_hu)
    sz, sy, sx = spacing
    return Phantom(scan_id, hu, labels, (float(sz), float(sy), float(sx)), findings, sentences)


def _scaled(k: float, r: tuple[float, float, float]) -> tuple[float, float, float]:
    return (k * r[0], k * r[1], k * r[2])


def _aorta_radius(findings: dict[str, int], geo: _Geometry) -> float:
    return (0.1 if findings["aortic_dilation"] else 0.06) * geo.W


def _organs(rng: np.random.Generator, findings: dict[str, int], geo: _Geometry) -> list[_Shape]:
    """The organs, enlarged where a finding says so."""
    H, W, L = geo.H, geo.W, geo.L
    ids = CLASS_IDS

    def jitter(s: float = 0.03) -> float:  # anatomy varies a little per scan
        return 1.0 + rng.uniform(-s, s)

    shapes: list[_Shape] = []
    # Lungs: two ellipsoids in the upper half, split into TotalSegmentator's lobes when painted.
    for label, cx in ((_RIGHT_LUNG, -0.38 * W), (_LEFT_LUNG, 0.38 * W)):
        shapes.append(_Shape(label, -850, (geo.lung_c, 0.0, cx), (0.24 * L * jitter(), 0.5 * H, 0.27 * W * jitter())))
    heart_scale = 1.35 if findings["cardiomegaly"] else 1.0
    heart_r = _scaled(heart_scale, (0.12 * L, 0.24 * H, 0.25 * W))
    shapes.append(_Shape(ids["heart"], 40, (0.6 * L, -0.15 * H, 0.06 * W), heart_r))
    aorta_r = _aorta_radius(findings, geo)
    shapes.append(_Shape(ids["aorta"], 50, (0.62 * L, 0.3 * H, 0.12 * W), (0.26 * L, aorta_r, aorta_r)))
    liver_r = (0.14 * L * jitter(), 0.45 * H, 0.4 * W * jitter())
    shapes.append(_Shape(ids["liver"], 60, (0.4 * L, 0.0, -0.35 * W), liver_r))
    spleen_scale = 1.4 if findings["splenomegaly"] else 1.0
    spleen_r = _scaled(spleen_scale, (0.08 * L, 0.18 * H, 0.15 * W))
    shapes.append(_Shape(ids["spleen"], 50, (0.42 * L, 0.3 * H, 0.5 * W), spleen_r))
    for side, cx in (("right", -0.35 * W), ("left", 0.35 * W)):
        shapes.append(_Shape(ids[f"kidney_{side}"], 30, (0.27 * L, 0.45 * H, cx), (0.09 * L, 0.14 * H, 0.11 * W)))
    return shapes


def _lesions(
    rng: np.random.Generator, findings: dict[str, int], geo: _Geometry
) -> tuple[list[_Shape], dict[str, list[str]], int | None]:
    """The focal lesions of the present findings, the report sentences per anatomy, and the index in
    _VERTEBRA_LEVELS of the vertebra with a bone lesion (None without one)."""
    H, W, L = geo.H, geo.W, geo.L
    ids = CLASS_IDS
    sentences = {a: list(v) for a, v in _NORMAL.items()}
    lesions: list[_Shape] = []
    if findings["lung_nodule"]:
        side = rng.choice(["right", "left"])
        lobe = rng.choice(["upper", "lower"])
        d = int(rng.integers(8, 20))
        cz = geo.lung_c + (0.1 if lobe == "upper" else -0.1) * L
        cx = (-0.38 if side == "right" else 0.38) * W
        lesions.append(_Shape(0, 30, (cz, 0.0, cx), (d / 2, d / 2, d / 2)))
        sentences["lung"] = [_ABNORMAL["lung_nodule"].format(d=d, side=side, lobe=lobe), _NORMAL["lung"][1]]
    if findings["cardiomegaly"]:
        sentences["heart"] = [_ABNORMAL["cardiomegaly"], _NORMAL["heart"][1]]
    if findings["aortic_dilation"]:
        sentences["aorta"] = [_ABNORMAL["aortic_dilation"].format(d=int(2 * _aorta_radius(findings, geo)))]
    if findings["liver_lesion"]:
        d = int(rng.integers(14, 30))
        lesions.append(_Shape(0, 10, (0.4 * L, 0.05 * H, -0.35 * W), (d / 2, d / 2, d / 2)))
        sentences["liver"] = [_ABNORMAL["liver_lesion"].format(d=d)]
    if findings["splenomegaly"]:
        sentences["spleen"] = [_ABNORMAL["splenomegaly"]]
    if findings["kidney_cyst"]:
        side = rng.choice(["right", "left"])
        d = int(rng.integers(10, 20))
        cx = (-0.35 if side == "right" else 0.35) * W
        lesions.append(_Shape(ids[f"kidney_cyst_{side}"], 0, (0.27 * L, 0.45 * H, cx), (d / 2, d / 2, d / 2)))
        sentences["kidney"] = [_ABNORMAL["kidney_cyst"].format(d=d, side=side)]
    bone_level = None
    if findings["bone_lesion"]:
        bone_level = int(rng.integers(0, len(_VERTEBRA_LEVELS)))
        sentences["bone"] = [_ABNORMAL["bone_lesion"].format(level=_VERTEBRA_LEVELS[bone_level]), _NORMAL["bone"][1]]
    return lesions, sentences, bone_level


def _render(
    geo: _Geometry,
    organs: list[_Shape],
    lesions: list[_Shape],
    bone_level: int | None,
    rng: np.random.Generator,
    noise_hu: float,
) -> tuple[np.ndarray, np.ndarray]:
    """HU (int16) and labels (uint8), one axial slice at a time: body, organs, spine, lesions, noise."""
    nz, ny, nx = geo.shape
    sz = geo.spacing[0]
    hu = np.empty(geo.shape, dtype=np.int16)
    labels = np.zeros(geo.shape, dtype=np.uint8)
    body = (geo.yy / (0.72 * geo.H)) ** 2 + (geo.xx / (0.92 * geo.W)) ** 2
    spine = _Spine(geo, bone_level)
    for k in range(nz):
        z = (k + 0.5) * sz
        sl = np.full((ny, nx), -1000.0, dtype=np.float32)
        lab = labels[k]
        sl[body <= 1.0] = -100.0
        sl[body <= 0.8] = 40.0
        _paint_organs(sl, lab, organs, z, geo)
        spine.paint(sl, lab, z)
        _paint_lesions(sl, lab, lesions, z, geo)
        if noise_hu:
            sl += rng.standard_normal(sl.shape, dtype=np.float32) * noise_hu
        hu[k] = np.clip(np.rint(sl), -1024, 3071)
    return hu, labels


def _paint_organs(sl: np.ndarray, lab: np.ndarray, organs: list[_Shape], z: float, geo: _Geometry) -> None:
    for s in organs:
        m = s.mask(z, geo.yy, geo.xx)
        if m is None:
            continue
        sl[m] = s.hu
        if s.label > 0:
            lab[m] = s.label
        else:
            _label_lung_lobes(lab, m, s.label == _RIGHT_LUNG, z, geo)


def _label_lung_lobes(lab: np.ndarray, m: np.ndarray, right: bool, z: float, geo: _Geometry) -> None:
    """Lobes by height, and the right middle lobe anteriorly."""
    ids = CLASS_IDS
    upper = z > geo.lung_c + (0.02 if right else -0.03) * geo.L
    if right:
        middle = (not upper) and z > geo.lung_c - 0.08 * geo.L
        lab[m] = ids["lung_upper_lobe_right"] if upper else ids["lung_lower_lobe_right"]
        if middle:
            lab[m & (geo.yy < 0)] = ids["lung_middle_lobe_right"]
    else:
        lab[m] = ids["lung_upper_lobe_left"] if upper else ids["lung_lower_lobe_left"]


class _Spine:
    """Vertebrae L5..T1 evenly along z behind the organs (a dense rim around a cancellous body, discs
    between them), one optionally with a sclerotic lesion."""

    def __init__(self, geo: _Geometry, lesion_level: int | None) -> None:
        self.lesion_level = lesion_level
        self.level_len = geo.L / len(_VERTEBRA_LEVELS)
        self.r = 0.1 * geo.W
        self.dist2 = (geo.yy - 0.55 * geo.H) ** 2 + geo.xx**2
        self.body = self.dist2 <= self.r**2
        self.rim = self.body & (self.dist2 >= (0.75 * self.r) ** 2)

    def paint(self, sl: np.ndarray, lab: np.ndarray, z: float) -> None:
        level = min(int(z / self.level_len), len(_VERTEBRA_LEVELS) - 1)
        if (z % self.level_len) <= 0.12 * self.level_len:  # a disc
            return
        sl[self.body] = 400.0
        sl[self.rim] = 700.0
        lab[self.body] = CLASS_IDS[f"vertebrae_{_VERTEBRA_LEVELS[level]}"]
        if self.lesion_level == level:
            zc = (level + 0.55) * self.level_len
            core = self.dist2 + (z - zc) ** 2 <= (0.6 * self.r) ** 2
            sl[core] = 1200.0


def _paint_lesions(sl: np.ndarray, lab: np.ndarray, lesions: list[_Shape], z: float, geo: _Geometry) -> None:
    for s in lesions:
        m = s.mask(z, geo.yy, geo.xx)
        if m is not None:
            m &= lab > 0  # lesions sit inside their organ
            sl[m] = s.hu
            if s.label > 0:
                lab[m] = s.label


def to_axcodes(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an array (and its affine) to `axcodes`, as a scanner's export might store it."""
    current = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(tuple(axcodes)))
    out = nib.orientations.apply_orientation(array, transform)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(transform, array.shape)


def write_nifti(path: str, array: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> None:
    data, aff = to_axcodes(array, affine, axcodes)
    img = nib.Nifti1Image(data, aff)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_dicom_series(folder: str, phantom: Phantom) -> None:
    """Write the phantom as an axial CT series (uint16 + RescaleIntercept -1024, as scanners do)."""
    write_ct_series(folder, phantom.hu, phantom.affine, phantom.scan_id)


def write_ct_series(
    folder: str,
    hu: np.ndarray,
    affine: np.ndarray,
    patient_id: str,
    transfer_syntax: str | None = None,
    file_name: str = "slice{k:04d}.dcm",
    intercept: int = -1024,
) -> list[str]:
    """Write an SPL-oriented int16 HU volume (z, y, x) and its RAS affine as a CT series, one file
    per axial slice (stored as uint16 with `intercept`, as scanners do), optionally compressed
    (pydicom's encoders: RLE Lossless, JPEG 2000 Lossless, JPEG-LS Lossless). `file_name` may use
    {k} and {uid} (the SOPInstanceUID): real exports often name files `CT.<uid>` with no extension."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM patient space is LPS
    col_step, row_step = lps[:3, 1], lps[:3, 2]  # array axis 1 runs down the rows, axis 2 along a row
    dy, dx = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    paths = []
    for k in range(hu.shape[0]):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.Modality, ds.PatientID = "CT", patient_id
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([k, 0, 0, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row_step / dx, col_step / dy])]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 0]))
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = (hu[k].astype(np.int32) - intercept).astype(np.uint16).tobytes()
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        path = os.path.join(folder, file_name.format(k=k, uid=uid))
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dataset(
    out_dir: str,
    n: int,
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 128, 128),
    spacing: tuple[float, float, float] = (3.0, 2.5, 2.5),
    lesion_rate: float = 0.5,
    dicom: int = 0,
    reconstructions: int = 0,
) -> list[Phantom]:
    """`n` phantoms as scans/<id>.nii.gz (RAS, like most exports), masks/<id>.nii.gz and
    reports.jsonl (scan_id, report, one 0/1 key per finding). The first `dicom` scans are
    written as DICOM series folders instead of NIfTI. Ids are phantom<i>, or with
    `reconstructions` > 0 CT-RATE's names, train_<patient>_a_<k>: that many per patient (each
    phantom its own volume), for ingest's `groups.pattern`."""
    os.makedirs(os.path.join(out_dir, "scans"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
    phantoms = []
    with open(os.path.join(out_dir, "reports.jsonl"), "w") as reports:
        for i in range(n):
            name = f"phantom{i:04d}"
            if reconstructions:
                name = f"train_{i // reconstructions + 1}_a_{i % reconstructions + 1}"
            p = make_phantom(name, seed * 100003 + i, shape, spacing, lesion_rate)
            if i < dicom:
                write_dicom_series(os.path.join(out_dir, "scans", p.scan_id), p)
            else:
                write_nifti(os.path.join(out_dir, "scans", p.scan_id + ".nii.gz"), p.hu, p.affine)
            write_nifti(os.path.join(out_dir, "masks", p.scan_id + ".nii.gz"), p.labels, p.affine)
            reports.write(json.dumps({"scan_id": p.scan_id, "report": p.report, **p.findings}) + "\n")
            phantoms.append(p)
    return phantoms
