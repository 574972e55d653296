"""Ingest from and to a real S3 API over HTTP (moto server on 127.0.0.1) through s3fs."""

import json
import threading
import time

import nibabel as nib
import pyarrow.parquet as pq
import pytest
import s3fs

from ctray.errors import StorageError
from ctray.ingest.job import run_ingest
from ctray.ingest.records import verify
from ctray.ingest.schema import label_map_of

from helpers import PHANTOM_SPACING, Relay, free_port, ingest_cfg, s3_shard_rows


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_phantoms_from_and_to_s3(ray_local, phantom_dir, s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("ct-in")
    fs.mkdir("ct-out")
    fs.put(str(phantom_dir) + "/", "ct-in/phantoms/", recursive=True)
    cfg = ingest_cfg(
        "s3://ct-in/phantoms/scans",
        "s3://ct-out/run1",
        f"storage.endpoint_url={s3_endpoint}",
        "storage.retries=2",
        masks="s3://ct-in/phantoms/masks",
        reports="s3://ct-in/phantoms/reports.jsonl",
    )
    result = run_ingest(cfg)
    assert (result.scans, result.quarantined) == (6, 0)
    assert result.manifest_uri == "s3://ct-out/run1/manifest.json"
    _, rows = s3_shard_rows(fs, "ct-out/run1")
    assert sorted(r["scan_id"] for r in rows) == [f"phantom{i:04d}" for i in range(6)]
    assert all(r["source"].startswith("s3://ct-in/phantoms/scans/") for r in rows)
    assert all(r["label_map"] is not None and r["anatomy_texts"] for r in rows)
    # resume against S3 too
    assert run_ingest(cfg).scans == 6


def test_storage_down_is_a_clear_error(ray_local, phantom_dir):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    cfg = ingest_cfg(
        phantom_dir / "scans",
        "s3://ct-out/down",
        f"storage.endpoint_url={dead}",
        "storage.retries=3",
        "storage.backoff_s=0.1",
        "storage.connect_timeout_s=1",
    )
    t0 = time.time()
    with pytest.raises(StorageError) as err:
        run_ingest(cfg)
    assert "s3://ct-out/down" in str(err.value) and "after 3 attempts" in str(err.value)
    assert "\n" not in str(err.value) and "testing" not in str(err.value)  # one line, no credentials
    assert time.time() - t0 < 60


@pytest.mark.timeout(180)
def test_storage_going_down_mid_job_keeps_committed_shards(ray_local, s3_endpoint, tmp_path):
    """S3 goes down while shards are still being written (one at a time): the job stops with one
    line; shards committed before the cut stay byte for byte; the re-run finishes the rest and
    leaves no scan twice and no commit pointing at a missing shard."""
    from ctray.data.phantoms import write_dataset

    write_dataset(str(tmp_path / "data"), 8, seed=5, shape=(16, 48, 48), spacing=PHANTOM_SPACING)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("ct-flaky")
    relay = Relay(int(s3_endpoint.rsplit(":", 1)[1]))
    cfg = ingest_cfg(
        tmp_path / "data" / "scans",
        "s3://ct-flaky/run",
        f"storage.endpoint_url={relay.endpoint}",
        "storage.retries=2",
        "storage.backoff_s=0.1",
        "storage.connect_timeout_s=1",
        "output.scans_per_shard=1",
        "concurrency=1",
    )
    failure: list[BaseException] = []

    def ingest():
        try:
            run_ingest(cfg)
        except BaseException as e:
            failure.append(e)

    worker = threading.Thread(target=ingest)
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(fs.find("ct-flaky/run/_commits", refresh=True)) < 2:
        time.sleep(0.05)
    relay.cut()
    worker.join(180)
    assert failure and isinstance(failure[0], StorageError) and "\n" not in str(failure[0]), failure
    committed = {p.rsplit("/", 1)[1][:-5] for p in fs.find("ct-flaky/run/_commits", refresh=True)}
    assert 2 <= len(committed) < 8, "storage went down before or after the shards were written"

    def stamp(path):  # the ETag is the bytes' MD5: a rewrite of the same bytes shows in LastModified (seconds) only
        info = fs.info(path, refresh=True)
        return info["ETag"], info["LastModified"]

    shards = fs.find("ct-flaky/run/shards", refresh=True)
    before = {p: stamp(p) for p in shards if p.rsplit("/", 1)[1][:-8] in committed}
    assert len(before) == len(committed)
    time.sleep(1.5)  # so that a shard rewritten by the re-run would get a later LastModified
    relay.restore()
    assert run_ingest(cfg).scans == 8
    assert {p: stamp(p) for p in before} == before  # the committed shards were not rewritten
    assert verify("s3://ct-flaky/run", cfg.storage) == []  # no scan twice, every commit's shard whole


def test_remote_nii_scan_with_a_nii_mask_of_the_same_name(ray_local, s3_endpoint, tmp_path):
    """Uncompressed .nii scan and mask share a file name; each is downloaded to its own folder (they
    once shared a temp path, and the mask's download overwrote the memory-mapped scan: SIGBUS)."""
    from ctray.data.phantoms import make_phantom

    p = make_phantom("case1", 3, shape=(16, 48, 48), spacing=PHANTOM_SPACING)
    (tmp_path / "scans").mkdir()
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(p.hu, p.affine), str(tmp_path / "scans" / "case1.nii"))
    nib.save(nib.Nifti1Image(p.labels, p.affine), str(tmp_path / "masks" / "case1.nii"))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("ct-nii")
    fs.put(str(tmp_path / "scans") + "/", "ct-nii/scans/", recursive=True)
    fs.put(str(tmp_path / "masks") + "/", "ct-nii/masks/", recursive=True)
    out = tmp_path / "out"
    result = run_ingest(
        ingest_cfg("s3://ct-nii/scans", out, f"storage.endpoint_url={s3_endpoint}", masks="s3://ct-nii/masks")
    )
    assert (result.scans, result.quarantined) == (1, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    row = pq.read_table(out / manifest["shards"][0]["path"]).to_pylist()[0]
    assert row["mask_source"] == "s3://ct-nii/masks/case1.nii" and row["label_map"] is not None
    assert (label_map_of(row) == 5).any()  # the liver survived: the mask was read as the mask
