"""The real CT and TotalSegmentator masks in ../shared/data through `ctray ingest`."""

import json
import shutil

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq

from ctray.ingest.job import run_ingest
from ctray.ingest.schema import label_map_of, volume_of

from helpers import ingest_cfg


def test_real_ct_with_its_masks(ray_local, shared_data, tmp_path):
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    masks.mkdir()
    shutil.copy(shared_data / "ct" / "example_ct_sm.nii.gz", scans / "s0001.nii.gz")
    shutil.copy(shared_data / "ct" / "example_seg.nii.gz", masks / "s0001.nii.gz")
    out = tmp_path / "out"
    result = run_ingest(ingest_cfg(scans, out, "preprocess.spacing=[3,1,1]", masks=masks))
    assert (result.scans, result.quarantined) == (1, 0)
    manifest = json.loads((out / "manifest.json").read_text())
    row = pq.read_table(out / manifest["shards"][0]["path"]).to_pylist()[0]
    vol, labels = volume_of(row), label_map_of(row)
    src = nib.load(str(shared_data / "ct" / "example_ct_sm.nii.gz"))
    seg = np.asarray(nib.load(str(shared_data / "ct" / "example_seg.nii.gz")).dataobj)
    # 3 mm isotropic source -> 3 x 1 x 1 mm: z keeps its slices, y and x about triple
    assert vol.shape[0] <= src.shape[2] and vol.shape[1] > 2 * 50 and row["spacing"] == [3.0, 1.0, 1.0]
    boxes = {b["anatomy"]: b for b in row["anatomy_boxes"]}
    assert {"liver", "spleen", "kidney", "stomach", "pancreas", "lung", "aorta", "bowel", "bone"} <= set(boxes)
    # nearest-neighbour labels: volume grows by the resampling factors (3 mm -> 1 mm in-plane)
    for name, ids in (("liver", [5]), ("spleen", [1])):
        ratio = boxes[name]["voxels"] / np.isin(seg, ids).sum()
        assert 7.0 < ratio < 11.0, (name, ratio)
    liver = labels == 5
    assert 20 < np.median(vol[liver]) < 150  # liver parenchyma HU
    assert np.median(vol[np.isin(labels, [10, 11, 13, 14])]) < -600  # aerated lung
    assert row["report_text"] is None and row["anatomy_texts"] == []
