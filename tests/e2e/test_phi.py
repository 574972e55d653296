"""No patient data outside the shards: canary strings in reports, in DICOM identifying tags, in
file names (the scan ids) and a canary SeriesInstanceUID (a folder's second series, whose scan id
would end in it) are run through the real `ctray ingest` command, each run with its own
local Ray whose session folder the test owns, and are searched for in everything the run left:
its stderr and stdout, every file of Ray's session logs (the shard writers run in other
processes), the manifest, the commit records and every other file of the output but the shards
(compressed; their rows are checked by tests/integration/test_dicom.py); with pseudonymised ids,
the original ids too
(also as the group keys of `groups:`, from the file names and the DICOM PatientID).
The runs join one Ray head whose temp folder the tests own (conftest.py's ray_head), so each run's check
also searches the logs the earlier runs left.

Four ways things go wrong: (a) S3 goes down mid-job (through the loopback relay), (b) a scan
whose header makes the reader raise with a canary in the exception's message, (c) NIfTI files that
are empty, not gzip, gzip of junk or cut inside the header, whose reader's messages quote their
paths (named by MRN), (d) a reports CSV without a header row (its first row is a report).
"""

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import s3fs

from ctray.data.phantoms import make_phantom, write_ct_series, write_nifti

from helpers import CTRAY_CLI, PHANTOM_SPACING, REPO, RayHead, Relay, ctray_cli

REPORT_CANARY = "CANARY-RPT-91f3"
TAG_CANARY = "CANARY-TAG-4c0d"
ID_CANARY = "CANARY-MRN-77a2"
UID_CANARY = "1.2.826.0.1.3680043.8.498.7777123456"
KEY = "k" * 32


def _dataset(root: Path, header: bool = True, corrupt: bool = False) -> Path:
    """Scans named by MRN-like ids; reports naming the patient; DICOM tags holding names; with
    `corrupt`, four unreadable NIfTI files named by MRN as well."""
    scans = root / "scans"
    scans.mkdir(parents=True)
    lines = ["scan_id,report"] if header else []
    for i in range(4):
        sid = f"{ID_CANARY}-{i}"
        p = make_phantom(sid, i, shape=(16, 40, 40), spacing=PHANTOM_SPACING)
        write_nifti(str(scans / f"{sid}.nii.gz"), p.hu, p.affine)
        lines.append(f'{sid},"Patient Jane {REPORT_CANARY} Doe. {p.report}"')
    p = make_phantom("d", 9, shape=(12, 40, 40), spacing=PHANTOM_SPACING)
    series = write_ct_series(str(scans / f"{ID_CANARY}-dicom"), p.hu, p.affine, f"{TAG_CANARY}-pid")
    for path in series:  # names and ids in the identifying tags
        ds = pydicom.dcmread(path)
        ds.PatientName = f"{TAG_CANARY}^Jane"
        ds.save_as(path)
    second = write_ct_series(str(scans / f"{ID_CANARY}-dicom"), p.hu, p.affine, "x", file_name="b{k:04d}.dcm")
    for path in second:  # the folder's second series: its scan id would be <folder>/<uid>
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = UID_CANARY
        ds.save_as(path)
    lines.append(f'{ID_CANARY}-dicom,"{REPORT_CANARY} follow-up. The lungs are clear."')
    crash = write_ct_series(str(scans / f"{ID_CANARY}-crash"), p.hu[:3], p.affine, "x")
    bad = write_ct_series(str(scans / f"{ID_CANARY}-badpos"), p.hu[:3], p.affine, "x")
    # What a broken exporter writes: text under a numeric tag (explicit VR LO), so that reading the
    # value as a number raises with the canary in the exception's message.
    ds = pydicom.dcmread(crash[1])
    ds.add_new((0x0028, 0x0008), "LO", f"{TAG_CANARY}-frames")  # NumberOfFrames
    ds.save_as(crash[1])
    ds = pydicom.dcmread(bad[1])
    del ds[(0x0020, 0x0032)]
    ds.add_new((0x0020, 0x0032), "LO", f"{TAG_CANARY}-pos")  # ImagePositionPatient
    ds.save_as(bad[1])
    if corrupt:
        import gzip

        (scans / f"{ID_CANARY}-empty.nii.gz").write_bytes(b"")
        (scans / f"{ID_CANARY}-plain.nii.gz").write_bytes(b"not gzip at all" * 20)
        (scans / f"{ID_CANARY}-junk.nii.gz").write_bytes(gzip.compress(b"\x07junk" * 100))
        (scans / f"{ID_CANARY}-short.nii").write_bytes((scans / f"{ID_CANARY}-0.nii.gz").read_bytes()[:60])
    (root / "reports.csv").write_text("\n".join(lines) + "\n")
    return scans


def _env(ray_head: RayHead) -> dict[str, str]:
    """A `ctray` process's environment: it joins the tests' Ray head, and holds the id key."""
    return {**ray_head.env, "CTRAY_ID_KEY": KEY}


def _leaks(canaries: list[str], texts: dict[str, str], ray_head: RayHead, output_files: list[Path]) -> list[str]:
    """Where any canary shows up: the process output, any file under Ray's session folders, or the
    output's records."""
    places = dict(texts)
    logs = list(Path(ray_head.temp).rglob("session_*/logs/**/*"))
    assert any(p.name.startswith("worker-") for p in logs), "the run's Ray worker logs were not found"
    for path in logs + output_files:
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("utf-8", "replace")
    return [f"{c} in {where}" for where, text in places.items() for c in canaries if c in text]


def _records(out: Path) -> list[Path]:
    """Every file of the output but the shards (whose compressed bytes would hide a canary)."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet")
    assert {out / "manifest.json", out / "ingest-config.yaml"} <= set(files)
    return files


def test_canaries_with_pseudonymised_ids_and_a_crashing_scan(tmp_path, ray_head):
    scans = _dataset(tmp_path, corrupt=True)
    out = tmp_path / "out"
    done = ctray_cli(
        "ingest",
        "/dev/null",
        f"input.scans={scans}",
        f"input.reports={tmp_path}/reports.csv",
        f"output.uri={out}",
        "preprocess.spacing=[3,2,2]",
        "output.scans_per_shard=2",
        "lease.settle_s=0.2",
        "privacy.pseudonymize_ids=true",
        "groups.dicom=patient",
        "groups.pattern=^(.+)-[0-9]+$",
        "input.require_report=false",
        env=_env(ray_head),
        timeout=300,
        check=True,
    )
    stdout, stderr = done.stdout, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["written"] == 7 and all(w["scan_id"].startswith("s") for w in manifest["written"])
    reasons = " ".join(q["reason"] for q in manifest["quarantine"]) + " ".join(s["reason"] for s in manifest["skipped"])
    assert "unreadable DICOM header (ValueError)" in reasons  # the crash, reduced to its type
    unreadable = [q["reason"] for q in manifest["quarantine"] if "not a readable NIfTI file (" in q["reason"]]
    assert len(unreadable) == 4 and all(r.startswith("scan s") for r in unreadable), unreadable  # by type only
    assert "lacks a usable ImageOrientationPatient, ImagePositionPatient or PixelSpacing" in reasons
    assert (
        _leaks(
            [REPORT_CANARY, TAG_CANARY, ID_CANARY, UID_CANARY],
            {"stdout": stdout, "stderr": stderr},
            ray_head,
            _records(out),
        )
        == []
    )
    probe_cache = [p for p in Path(str(out) + ".id_map.jsonl.probe").iterdir()]
    assert probe_cache and not [p for p in probe_cache if TAG_CANARY in p.read_text()]  # groups cached as hashes
    assert [p for p in probe_cache if UID_CANARY in p.read_text()]  # the UID reached ctray, and stayed here
    id_map = [json.loads(line) for line in Path(str(out) + ".id_map.jsonl").read_text().splitlines()]
    assert {e["source_id"] for e in id_map if e["source_id"]} >= {
        f"{ID_CANARY}-{i}" for i in range(4)
    }  # kept apart, for the user


@pytest.mark.timeout(180)
def test_canaries_when_storage_goes_down_mid_job(tmp_path, s3_endpoint, ray_head):
    scans = _dataset(tmp_path)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("phi-out")
    relay = Relay(int(s3_endpoint.rsplit(":", 1)[1]))
    # A process, not ctray_cli: its storage is cut while it runs.
    proc = subprocess.Popen(
        [
            *CTRAY_CLI,
            "ingest",
            "/dev/null",
            f"input.scans={scans}",
            f"input.reports={tmp_path}/reports.csv",
            "output.uri=s3://phi-out/run",
            f"storage.endpoint_url={relay.endpoint}",
            "storage.retries=2",
            "storage.backoff_s=0.1",
            "storage.connect_timeout_s=1",
            "preprocess.spacing=[3,2,2]",
            "output.scans_per_shard=1",
            "concurrency=1",
            "lease.settle_s=0.2",
            "input.require_report=false",
            "privacy.pseudonymize_ids=true",
        ],
        env=_env(ray_head),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 180
    while time.time() < deadline and len(fs.find("phi-out/run/_commits", refresh=True)) < 1 and proc.poll() is None:
        time.sleep(0.05)
    relay.cut()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "storage unreachable" in stderr.strip().splitlines()[-1], stderr[-3000:]
    local = tmp_path / "fetched"
    fs.get("phi-out/run/", str(local) + "/", recursive=True)
    records = [p for p in local.rglob("*.json")]
    assert any("_commits" in str(p) for p in records), "nothing was committed before the cut"
    canaries = [REPORT_CANARY, TAG_CANARY, ID_CANARY, UID_CANARY]
    assert _leaks(canaries, {"stdout": stdout, "stderr": stderr}, ray_head, records) == []


def test_headerless_reports_csv_is_one_line_without_the_report(tmp_path, ray_head):
    scans = _dataset(tmp_path, header=False)
    done = ctray_cli(
        "ingest",
        "/dev/null",
        f"input.scans={scans}",
        f"input.reports={tmp_path}/reports.csv",
        f"output.uri={tmp_path}/out",
        "lease.settle_s=0.2",
        env=_env(ray_head),
        timeout=300,
    )
    stdout, stderr = done.stdout, done.stderr
    assert done.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ctray: error: reports.csv: no column named 'scan_id', 'report'"), stderr[-2000:]
    texts = {"stdout": stdout, "stderr": stderr}
    places = [f"{c} in {w}" for w, t in texts.items() for c in (REPORT_CANARY, ID_CANARY) if c in t]
    assert places == []
