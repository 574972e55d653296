"""DICOM as hospitals export it, through `ctray ingest` on a real local Ray.

Real series: pydicom's test data (a dependency, so always here) holds real CT series from a
scanner export whose files have no extension (dicomdirtests/98892001: a 5-slice axial series and
a 2-image localizer) and a DICOMDIR. Real compressed files: pydicom's test files encoded by real
tools (JPEG 2000, JPEG-LS, RLE, JPEG lossless). A real compressed series: the real CT in
../shared/data written as a series and compressed by pydicom's encoders (skipped without it).
Bad series are made from the real one by the edits an export goes wrong with: a slice missing, a
truncated file, a tilted gantry.
"""

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from ctray.data.phantoms import to_axcodes, write_ct_series
from ctray.errors import ConfigError
from ctray.ingest.dicom import quiet_pydicom
from ctray.ingest.job import run_ingest
from ctray.ingest.privacy import Names
from ctray.ingest.schema import volume_of

from helpers import ingest_cfg

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PATIENT = TEST_FILES / "dicomdirtests" / "98892001"


def _rows(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {r["scan_id"]: r for s in manifest["shards"] for r in pq.read_table(out / s["path"]).to_pylist()}


def _edit(src: Path, dst: Path, edit) -> None:
    """Copy a series, applying edit(index, dataset) to each slice in z order."""
    dst.mkdir(parents=True)
    files = sorted(src.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if edit(i, ds) is not False:
            ds.save_as(dst / path.name)


def test_real_series_as_exported(ray_local, tmp_path):
    """A patient folder with files without extensions: the axial series is a scan, the localizer,
    DICOMDIR and an MR series are skipped, a second series in one folder is a second scan, and the
    broken copies are quarantined with the figures that show what is wrong."""
    scans = tmp_path / "scans"
    shutil.copytree(PATIENT / "CT5N", scans / "patient1" / "CT5N")
    shutil.copytree(PATIENT / "CT2N", scans / "patient1" / "CT2N")
    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", scans / "DICOMDIR")
    shutil.copytree(TEST_FILES / "dicomdirtests" / "98892003" / "MR1", scans / "mr")
    new_uid = pydicom.uid.generate_uid()

    def second_series(i, ds):
        ds.SeriesInstanceUID = new_uid
        ds.ImagePositionPatient = [
            ds.ImagePositionPatient[0],
            ds.ImagePositionPatient[1],
            ds.ImagePositionPatient[2] + 100,
        ]

    _edit(PATIENT / "CT5N", scans / "both", lambda i, ds: None)
    _edit(PATIENT / "CT5N", scans / "both_copy", second_series)
    for p in (scans / "both_copy").iterdir():
        p.rename(scans / "both" / (p.name + "b"))
    (scans / "both_copy").rmdir()
    _edit(PATIENT / "CT5N", scans / "gap", lambda i, ds: False if i == 2 else None)
    _edit(
        PATIENT / "CT5N",
        scans / "tilted",
        lambda i, ds: setattr(
            ds,
            "ImagePositionPatient",
            [
                ds.ImagePositionPatient[0],
                ds.ImagePositionPatient[1] + 2.5 * i * np.tan(np.radians(20)),
                ds.ImagePositionPatient[2],
            ],
        ),
    )
    shutil.copytree(PATIENT / "CT5N", scans / "corrupt")
    victim = sorted((scans / "corrupt").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-100])  # a transfer cut short, inside the pixel data

    out = tmp_path / "out"
    result = run_ingest(
        ingest_cfg(
            scans,
            out,
            "preprocess.spacing=[2.5,0.488281,0.488281]",
            "preprocess.crop_foreground=false",
            "output.scans_per_shard=2",
            "lease.settle_s=0",
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    rows = _rows(out)
    uids = {pydicom.dcmread(next((scans / "both").iterdir())).SeriesInstanceUID, new_uid}
    assert set(rows) == {"patient1/CT5N"} | {f"both/{u}" for u in uids}
    quarantine = {q["scan_id"]: q["reason"] for q in manifest["quarantine"]}
    assert set(quarantine) == {"gap", "tilted", "corrupt"}
    assert "non-uniform slice spacing, steps 2.5..5 mm (median 2.5 mm; a missing slice?)" in quarantine["gap"]
    assert "gantry tilt of 20.0 deg" in quarantine["tilted"]
    assert "pixel data of slice 4 (Explicit VR Little Endian) cannot be decoded (ValueError)" in quarantine["corrupt"]
    skipped = {s["input"].removeprefix(str(scans) + "/"): s["reason"] for s in manifest["skipped"]}
    assert any(
        k.startswith("patient1/CT2N (series") and "localizer/scout series of 2 image(s)" in r
        for k, r in skipped.items()
    )
    assert "without image data" in skipped["DICOMDIR"]
    assert any(k.startswith("mr (series") and "modality MR, not CT" in r for k, r in skipped.items())
    assert result.skipped == len(skipped)

    # The stored volume is the series itself: slices in head-foot order, HU = stored * slope + intercept.
    with quiet_pydicom():
        slices = sorted(
            (pydicom.dcmread(p) for p in (PATIENT / "CT5N").iterdir()), key=lambda d: float(d.ImagePositionPatient[2])
        )
    expected = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    row = rows["patient1/CT5N"]
    assert row["spacing"] == pytest.approx([2.5, 0.488281, 0.488281], rel=1e-5)
    assert np.array_equal(volume_of(row), expected.astype(np.int16))


@pytest.mark.parametrize(
    "name, twin",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", None),
        ("693_J2KI.dcm", None),
        ("JPEGLSNearLossless_16.dcm", None),
    ],
)
def test_compressed_transfer_syntaxes_decode(name, twin):
    """The declared decoders (python-gdcm, pylibjpeg) read files encoded by real tools; lossless
    ones equal their uncompressed twin."""
    with quiet_pydicom():
        pixels = pydicom.dcmread(TEST_FILES / name).pixel_array
        if twin:
            assert np.array_equal(pixels, pydicom.dcmread(TEST_FILES / twin).pixel_array)
    assert pixels.size > 0


def test_compressed_real_ct_series_equals_its_nifti(ray_local, shared_data, tmp_path):
    """The real CT as JPEG 2000, JPEG-LS and RLE series with files named CT.<uid> (no extension)
    lands in the shards voxel for voxel like the NIfTI it came from."""
    img = nib.load(str(shared_data / "ct" / "example_ct_sm.nii.gz"))
    hu, affine = to_axcodes(np.asarray(img.dataobj, dtype=np.int16), img.affine, "SPL")
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(shared_data / "ct" / "example_ct_sm.nii.gz", scans / "nifti.nii.gz")
    syntaxes = {
        "j2k": pydicom.uid.JPEG2000Lossless,
        "jpegls": pydicom.uid.JPEGLSLossless,
        "rle": pydicom.uid.RLELossless,
    }
    for name, syntax in syntaxes.items():
        write_ct_series(str(scans / name), hu, affine, "P0001", syntax, "CT.{uid}", intercept=-2048)
    out = tmp_path / "out"
    run_ingest(ingest_cfg(scans, out, "preprocess.spacing=[3,1,1]", "output.scans_per_shard=4", "lease.settle_s=0"))
    rows = _rows(out)
    assert set(rows) == {"nifti", *syntaxes}
    reference = volume_of(rows["nifti"])
    for name in syntaxes:
        assert np.array_equal(volume_of(rows[name]), reference), name
        assert rows[name]["affine"] == pytest.approx(rows["nifti"]["affine"], abs=1e-4)


TAG_CANARY = "CANARY-PID-3b9e"


def test_groups_from_patient_and_study_tags(ray_local, tmp_path, monkeypatch, caplog):
    """`groups.dicom`: the probe reads PatientID (or StudyInstanceUID) and nothing else of the
    identifying tags; a patient's two series share a group, another patient's differs, a series
    without the tag is its own group (counted). PatientIDs are stored as keyed hashes only: the
    canary PatientID is in no row, record, probe cache, id map or log. Without pseudonymisation
    `patient` is refused in one line; `study` stores the StudyInstanceUID."""
    scans = tmp_path / "scans"
    _edit(PATIENT / "CT5N", scans / "first", lambda i, ds: None)
    other_series = pydicom.uid.generate_uid()
    _edit(PATIENT / "CT5N", scans / "second", lambda i, ds: setattr(ds, "SeriesInstanceUID", other_series))
    _edit(PATIENT / "CT5N", scans / "canary", lambda i, ds: setattr(ds, "PatientID", TAG_CANARY))
    _edit(PATIENT / "CT5N", scans / "anonymous", lambda i, ds: delattr(ds, "PatientID"))
    first = pydicom.dcmread(next((scans / "first").iterdir()))
    settings = ("preprocess.spacing=[2.5,2,2]", "output.scans_per_shard=2", "lease.settle_s=0")

    with pytest.raises(ConfigError) as refused:
        ingest_cfg(scans, tmp_path / "refused", *settings, "groups.dicom=patient")
    message = str(refused.value)
    assert "\n" not in message and "groups.dicom=patient" in message and "privacy.pseudonymize_ids=true" in message

    monkeypatch.setenv("CTRAY_ID_KEY", "k" * 32)
    out = tmp_path / "out"
    cfg = ingest_cfg(scans, out, *settings, "groups.dicom=patient", "privacy.pseudonymize_ids=true")
    with caplog.at_level(logging.INFO, logger="ctray"):
        run_ingest(cfg)
    names, written = Names(cfg), _rows(out)
    rows = {sid: written[names.scan_id(sid, "")] for sid in ("first", "second", "canary", "anonymous")}
    groups = {sid: row["group"] for sid, row in rows.items()}
    assert groups["first"] == groups["second"] == names.group(str(first.PatientID))
    assert groups["canary"] == names.group(TAG_CANARY) != groups["first"] and groups["canary"].startswith("g")
    assert groups["anonymous"] == rows["anonymous"]["scan_id"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["ungrouped"] == 1
    leaks = [p for p in Path(str(out) + ".id_map.jsonl.probe").rglob("*") if p.is_file()]  # the probe cache
    leaks += [out / "manifest.json", *(out / "_commits").iterdir(), Path(str(out) + ".id_map.jsonl")]
    assert len(leaks) > 4 and not [p for p in leaks if TAG_CANARY in p.read_text()]
    assert TAG_CANARY not in json.dumps([{k: v for k, v in r.items() if isinstance(v, str)} for r in rows.values()])
    assert TAG_CANARY not in caplog.text and "1 of 4 scans are in no group" in caplog.text

    monkeypatch.delenv("CTRAY_ID_KEY")
    study = tmp_path / "study"
    run_ingest(ingest_cfg(scans, study, *settings, "groups.dicom=study"))
    study_groups = {sid: row["group"] for sid, row in _rows(study).items()}
    assert study_groups == dict.fromkeys(groups, str(first.StudyInstanceUID))


SERIES_CANARY = "1.2.826.0.1.3680043.8.498.4242424242"
SCOUT_CANARY = "1.2.826.0.1.3680043.8.498.4343434343"


def test_series_uids_stay_out_of_a_pseudonymised_output(ray_local, tmp_path, monkeypatch, caplog):
    """A folder holding two axial series and a localizer: unpseudonymised, the series' scan ids are
    `<folder>/<SeriesInstanceUID>`. Pseudonymised, the canary UIDs reach no row, commit record,
    manifest, other file of the output (no _probe/ there) or log line, only the id map and the probe
    cache beside it, which are meant to hold the originals."""
    scans = tmp_path / "scans"
    _edit(PATIENT / "CT5N", scans / "both", lambda i, ds: None)

    def second_series(i, ds):
        ds.SeriesInstanceUID = SERIES_CANARY
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 100]

    _edit(PATIENT / "CT5N", tmp_path / "second", second_series)
    _edit(PATIENT / "CT2N", tmp_path / "scout", lambda i, ds: setattr(ds, "SeriesInstanceUID", SCOUT_CANARY))
    for p in [*(tmp_path / "second").iterdir(), *(tmp_path / "scout").iterdir()]:
        p.rename(scans / "both" / (p.parent.name + p.name))

    monkeypatch.setenv("CTRAY_ID_KEY", "k" * 32)
    out = tmp_path / "out"
    cfg = ingest_cfg(scans, out, "preprocess.spacing=[2.5,2,2]", "lease.settle_s=0", "privacy.pseudonymize_ids=true")
    with caplog.at_level(logging.INFO, logger="ctray"):
        result = run_ingest(cfg)
    assert (result.scans, result.skipped) == (2, 1)
    names, rows = Names(cfg), _rows(out)
    first = str(pydicom.dcmread(next((PATIENT / "CT5N").iterdir())).SeriesInstanceUID)
    assert set(rows) == {names.scan_id(f"both/{uid}", "") for uid in (first, SERIES_CANARY)}  # ids of the UIDs
    canaries = (SERIES_CANARY, SCOUT_CANARY)
    strings = [{k: v for k, v in r.items() if k not in ("volume", "label_map")} for r in rows.values()]
    places = {"shard rows": json.dumps(strings, default=str), "logs": caplog.text}
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet"]  # shards: their rows, above
    assert {p.name for p in files} >= {"manifest.json", "ingest-config.yaml", "key-check.json"}
    assert not (out / "_probe").exists() and len([p for p in files if p.parent.name == "_commits"]) == 1
    places.update({str(p): p.read_text() for p in files})
    assert [f"{c} in {where}" for where, text in places.items() for c in canaries if c in text] == []
    kept = Path(str(out) + ".id_map.jsonl").read_text()  # where the originals belong
    assert SERIES_CANARY in kept and SCOUT_CANARY in kept
