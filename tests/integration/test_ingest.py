"""Ingest on a real local Ray (ctray.ingest.job.run_ingest): phantoms -> shards -> manifest, resume,
bad input. A `ctray ingest` process killed mid-job and run again: e2e/test_ingest_cli.py."""

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctray.config import StorageConfig
from ctray.data.phantoms import make_phantom, write_nifti
from ctray.errors import ConfigError
from ctray.ingest.job import run_ingest
from ctray.ingest.records import verify
from ctray.ingest.schema import SCHEMA_VERSION, label_map_of, volume_of
from ctray.ingest.shardset import COMMITS_DIR, CommitRecord

from helpers import ingest_cfg, read_rows


def test_phantoms_to_local_shards(ray_local, phantom_dir, tmp_path):
    out = tmp_path / "shards"
    cfg = ingest_cfg(phantom_dir / "scans", out, masks=phantom_dir / "masks", reports=phantom_dir / "reports.jsonl")
    result = run_ingest(cfg)
    assert (result.scans, result.quarantined, result.shards) == (6, 0, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["counts"]["scans"] == 6 and manifest["config"]["output"]["uri"] == str(out)
    assert {w["scan_id"] for w in manifest["written"]} == {f"phantom{i:04d}" for i in range(6)}
    assert manifest["counts"]["inputs"] == 6 and not manifest["skipped"] and not manifest["quarantine"]
    commits = [CommitRecord.from_json(json.loads(p.read_text())) for p in (out / COMMITS_DIR).iterdir()]
    for record in commits:  # each commit record names its shard's bytes: `ctray verify` checks them
        assert record.path is not None
        shard = out / record.path
        assert record.bytes == shard.stat().st_size and record.sha256 == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert sorted(s.scan_id for r in commits for s in r.scans) == [f"phantom{i:04d}" for i in range(6)]
    assert verify(str(out), StorageConfig()) == []
    rows = read_rows(out)
    reports = {
        json.loads(line)["scan_id"]: json.loads(line)
        for line in (phantom_dir / "reports.jsonl").read_text().splitlines()
    }
    for sid, row in rows.items():
        vol, labels = volume_of(row), label_map_of(row)
        assert vol.dtype == np.int16 and vol.shape == labels.shape == tuple(row["shape"])
        assert row["spacing"] == pytest.approx([3.0, 2.0, 2.0])
        assert row["orientation"] == "SPL"
        # lungs are air-filled and bone is dense: the HU survived orientation and resampling
        lung = np.isin(labels, [10, 11, 12, 13, 14])
        assert np.median(vol[lung]) < -700 and np.median(vol[labels == 27]) > 250
        boxes = {b["anatomy"]: b for b in row["anatomy_boxes"]}
        assert {"lung", "heart", "liver", "spleen", "kidney", "aorta", "bone"} <= set(boxes)
        z0, y0, x0, z1, y1, x1 = boxes["liver"]["box"]
        assert (labels[z0:z1, y0:y1, x0:x1] == 5).sum() == boxes["liver"]["voxels"] == (labels == 5).sum()
        texts = {t["anatomy"]: t["sentences"] for t in row["anatomy_texts"]}
        expected = reports[sid]
        assert {lab["name"]: lab["value"] for lab in row["labels"]} == {
            k: v for k, v in expected.items() if k not in ("scan_id", "report")
        }
        if expected["liver_lesion"]:
            assert any("hypodense lesion" in s for s in texts["liver"])
        assert row["report_parser"] == "rules" and len(row["content_hash"]) == 64
        assert row["report_text"] is None  # privacy.keep_report_text defaults to off
        assert row["group"] == sid  # no groups: setting: each scan its own group
    dicom_row = rows["phantom0000"]
    assert dicom_row["source"].endswith("scans/phantom0000") and dicom_row["label_map"] is not None

    # Re-running the same command commits nothing new and rewrites nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = run_ingest(cfg)
    assert again.scans == 6
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes


def test_changed_preprocessing_refuses_to_mix(ray_local, phantom_dir, tmp_path):
    out = tmp_path / "shards"
    run_ingest(ingest_cfg(phantom_dir / "scans", out, "output.scans_per_shard=6"))
    with pytest.raises(ConfigError, match="already holds shards made with other settings"):
        run_ingest(ingest_cfg(phantom_dir / "scans", out, "preprocess.spacing=[3,1,1]"))


def _bad_inputs(root: Path) -> dict[str, str]:
    """Write good and bad scans; return scan id -> the words its quarantine reason must hold."""
    scans, masks = root / "scans", root / "masks"
    scans.mkdir()
    masks.mkdir()
    reports = []
    good = make_phantom("good", 7, shape=(16, 40, 40), spacing=(3.0, 4.0, 4.0))
    for sid in (
        "good",
        "good2",
        "corrupt",
        "truncated",
        "flat2d",
        "fourd",
        "nan",
        "mr",
        "badmask",
        "noreport",
        "emptyreport",
        "badutf8",
        "nomask",
        "liar",
        "huge",
        "longreport",
        "stretched",
    ):
        if sid != "nomask":
            write_nifti(str(masks / f"{sid}.nii.gz"), good.labels, good.affine)
        reports.append((sid, good.report.encode()))
        write_nifti(str(scans / f"{sid}.nii.gz"), good.hu, good.affine)
    (scans / "corrupt.nii.gz").write_bytes(b"this is not a nifti file at all" * 10)
    data = (scans / "truncated.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    nib.save(nib.Nifti1Image(good.hu[8], np.eye(4)), str(scans / "flat2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([good.hu, good.hu], -1), good.affine), str(scans / "fourd.nii.gz"))
    nan = good.hu.astype(np.float32)
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, good.affine), str(scans / "nan.nii.gz"))
    nib.save(nib.Nifti1Image((good.hu.astype(np.int32) + 1024).astype(np.int16), good.affine), str(scans / "mr.nii.gz"))
    write_nifti(str(masks / "badmask.nii.gz"), good.labels[:, :30], good.affine)
    (scans / "liar.nii.gz").write_bytes(lying_header((1024, 1024, 512)))  # claims 1 GiB, holds nothing
    (scans / "huge.nii.gz").write_bytes(lying_header((4096, 4096, 4096)))  # beyond preprocess.max_voxels
    stretched = good.affine.copy()
    stretched[:3, :3] *= 100  # pixdim 100x: 25,600 voxels in the file, 9.1e10 at the target spacing
    write_nifti(str(scans / "stretched.nii.gz"), good.hu, stretched)
    write_nifti(str(masks / "stretched.nii.gz"), good.labels, stretched)
    (scans / "README.txt").write_text("exported by the PACS")
    (scans / "notes").mkdir()
    (scans / "notes" / "series.json").write_text("{}")
    reports = [(s, r) for s, r in reports if s != "noreport"]
    reports = [
        (s, b"   " if s == "emptyreport" else (b"Lung \xff\xfe nodule." if s == "badutf8" else r)) for s, r in reports
    ]
    # over csv's default field limit (131,072), which used to fail the whole table, and reports.max_chars
    reports = [(s, r + b" Heart size is normal." * 10_000 if s == "longreport" else r) for s, r in reports]
    with open(root / "reports.csv", "wb") as f:
        f.write(b"scan_id,report\n")
        for sid, text in reports:
            f.write(sid.encode() + b',"' + text + b'"\n')
    return {
        "corrupt": "not a readable NIfTI",
        "truncated": "truncated or corrupt",
        "flat2d": "2D image",
        "fourd": "4D image",
        "nan": "NaN or infinite",
        "mr": "not CT",
        "badmask": "grid (16, 30, 40) differs from its scan's",
        "noreport": "no report",
        "emptyreport": "report is empty",
        "badutf8": "not valid UTF-8",
        "nomask": "no mask",
        "liar": "truncated image data",
        "huge": "more than preprocess.max_voxels",
        "longreport": "characters, over the 100,000 limit (reports.max_chars)",
        "stretched": "resample to 1501x7801x7801 = 91344257101 voxels at 3x2x2 mm, more than preprocess.max_voxels",
    }


def lying_header(shape: tuple[int, int, int]) -> bytes:
    """A .nii.gz of a few dozen bytes whose header claims `shape` int16 voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4)


def test_bad_inputs_are_quarantined_and_nothing_good_is_lost(ray_local, tmp_path, caplog):
    expected = _bad_inputs(tmp_path)
    out = tmp_path / "shards"
    result = run_ingest(
        ingest_cfg(
            tmp_path / "scans",
            out,
            "output.scans_per_shard=3",
            masks=tmp_path / "masks",
            reports=tmp_path / "reports.csv",
        )
    )
    assert result.scans == 2 and result.quarantined == len(expected) and result.skipped == 2
    assert set(read_rows(out)) == {"good", "good2"}
    manifest = json.loads((out / "manifest.json").read_text())
    quarantine = {q["scan_id"]: q for q in manifest["quarantine"]}
    assert set(quarantine) == set(expected)
    skipped = {Path(s["input"]).name: s["reason"] for s in manifest["skipped"]}  # every input is accounted for
    assert set(skipped) == {"README.txt", "series.json"} and all("not an image" in r for r in skipped.values())
    assert manifest["counts"]["inputs"] == 2 + len(expected) + 2
    for sid, words in expected.items():
        reason = quarantine[sid]["reason"]
        assert words in reason, (sid, reason)
        assert "\n" not in reason and reason.startswith(quarantine[sid]["input"] + ":"), (sid, reason)
    # report text never reaches the logs, even for quarantined reports
    assert "Heart size" not in caplog.text and "Lung" not in caplog.text

    # fixing an input and re-running picks it up; earlier shards stay as they were
    good = make_phantom("good", 7, shape=(16, 40, 40), spacing=(3.0, 4.0, 4.0))
    write_nifti(str(tmp_path / "scans" / "nan.nii.gz"), good.hu, good.affine)
    result = run_ingest(
        ingest_cfg(
            tmp_path / "scans",
            out,
            "output.scans_per_shard=3",
            masks=tmp_path / "masks",
            reports=tmp_path / "reports.csv",
        )
    )
    assert result.scans == 3 and result.quarantined == len(expected) - 1
    assert set(read_rows(out)) == {"good", "good2", "nan"}


def test_a_header_claiming_a_gibibyte_costs_no_memory(tmp_path):
    """The header says 1024x1024x512 int16; the file holds a few bytes. Measured in a fresh process:
    reading it must not commit the memory the header claims (nibabel's reader zero-fills it all)."""
    (tmp_path / "liar.nii.gz").write_bytes(lying_header((1024, 1024, 512)))
    code = (
        "import resource, sys\n"
        "from ctray.errors import BadInput\n"
        "from ctray.ingest.volume import load_nifti\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    load_nifti({str(tmp_path / 'liar.nii.gz')!r}, 'liar', 2**29)\n"
        "except BadInput as e:\n"
        "    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    reason, extra_mib = done.stdout.strip().splitlines()
    assert reason.startswith("liar: truncated image data (") and reason.endswith("of 1073741824 bytes)"), (
        done.stdout + done.stderr
    )
    assert int(extra_mib) < 64  # the claim is 1024 MiB


def test_ct_rate_report_layout_through_ingest(ray_local, phantom_dir, tmp_path):
    """Reports as CT-RATE ships them: gzip-compressed JSONL with Findings and Impressions in two
    fields and ids that are file names, plus a separate labels table whose values win."""
    rows = [json.loads(line) for line in (phantom_dir / "reports.jsonl").read_text().splitlines()]
    half = [
        {
            "VolumeName": r["scan_id"] + ".nii.gz",
            "Findings_EN": r["report"].rsplit(". ", 1)[0],
            "Impressions_EN": r["report"].rsplit(". ", 1)[1],
        }
        for r in rows
    ]
    (tmp_path / "reports.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in half).encode()))
    (tmp_path / "labels.csv").write_text(
        "VolumeName,liver_lesion,extra\n" + "".join(f"{r['scan_id']}.nii.gz,{1 - r['liver_lesion']},1\n" for r in rows)
    )
    out = tmp_path / "out"
    result = run_ingest(
        ingest_cfg(
            phantom_dir / "scans",
            out,
            "input.report_id_column=VolumeName",
            "input.report_text_columns=[Findings_EN,Impressions_EN]",
            f"input.labels={tmp_path}/labels.csv",
            "output.scans_per_shard=6",
            reports=tmp_path / "reports.jsonl.gz",
        )
    )
    assert (result.scans, result.quarantined) == (6, 0)
    by_id = {r["scan_id"]: r for r in rows}
    for sid, row in read_rows(out).items():
        labels = {lab["name"]: lab["value"] for lab in row["labels"]}
        assert labels == {"liver_lesion": 1 - by_id[sid]["liver_lesion"], "extra": 1}  # the labels table's values
        sentences = [s for t in row["anatomy_texts"] for s in t["sentences"]]
        assert sentences and all(s in by_id[sid]["report"] for s in sentences)  # both fields' sentences, unmerged
