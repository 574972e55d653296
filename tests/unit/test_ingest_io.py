"""Ingest's file I/O: .nii.gz inflated by isal (ISA-L) gives the voxels zlib gives, the zlib
fallback where isal is not importable, a corrupt gzip stream refused by both; a shard's Parquet
writer (ctray.ingest.shards.open_shard)."""

from __future__ import annotations

import gzip
import sys
import zlib

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from ctray.errors import BadInput
from ctray.ingest.schema import SHARD_SCHEMA, volume_of
from ctray.ingest.shards import open_shard, write_row
from ctray.ingest.volume import gzip_reader, load_nifti

AFFINE = np.diag([0.7, 0.7, 1.5, 1.0])


def _volume(dtype: str, shape: tuple[int, int, int] = (96, 80, 37)) -> np.ndarray:
    """CT-like values: smooth anatomy plus noise, so that deflate finds both matches and literals."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = np.where(z**2 + y**2 + x**2 < 0.8, 40.0, -1000.0) + rng.normal(0, 20, shape)
    if dtype == "uint8":
        return (body > 0).astype(np.uint8) * rng.integers(1, 117, shape, dtype=np.uint8)
    return body.astype(dtype)


def _nifti(path, data: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> str:
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return str(path)


@pytest.fixture(params=["isal", "zlib"])
def inflater(request, monkeypatch):
    """Each test once with isal (skipped where it is not installed) and once with the standard
    library's zlib, as on a platform without isal's wheels (its import made to fail)."""
    if request.param == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)
    assert gzip_reader().name.startswith(request.param)
    return request.param


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
def test_nii_gz_voxels_are_the_ones_nibabel_reads(tmp_path, inflater, dtype):
    data = _volume(dtype)
    path = _nifti(tmp_path / "scan.nii.gz", data, slope=2.0 if dtype == "int16" else 1.0, inter=-1.0)
    scan = load_nifti(path, "scan")
    assert scan.data.dtype == data.dtype and scan.data.shape == data.shape
    np.testing.assert_array_equal(scan.data, data)
    np.testing.assert_array_equal(scan.data, np.asanyarray(nib.load(path).dataobj.get_unscaled()))
    assert (scan.slope, scan.inter) == ((2.0, -1.0) if dtype == "int16" else (1.0, -1.0))


def test_isal_and_zlib_read_the_same_bytes(tmp_path, monkeypatch):
    pytest.importorskip("isal")
    path = _nifti(tmp_path / "scan.nii.gz", _volume("int16", (128, 128, 60)))
    fast = load_nifti(path, "scan")
    monkeypatch.setitem(sys.modules, "isal", None)
    plain = load_nifti(path, "scan")
    assert fast.data.tobytes(order="A") == plain.data.tobytes(order="A")
    np.testing.assert_array_equal(fast.affine, plain.affine)


def test_a_gzip_stream_of_several_members_reads_whole(tmp_path, inflater):
    """As bgzip and parallel gzip tools write: members concatenated."""
    data = _volume("int16")
    _nifti(tmp_path / "plain.nii", data)
    raw = (tmp_path / "plain.nii").read_bytes()
    cut = len(raw) // 3
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    np.testing.assert_array_equal(load_nifti(str(tmp_path / "members.nii.gz"), "members").data, data)


@pytest.mark.parametrize("damage", ["crc", "length", "deflate"])
def test_a_corrupt_gzip_stream_is_refused(tmp_path, inflater, damage):
    """Also where the stream still inflates to as many bytes as the header asks for: the trailer's
    CRC and length are checked (the voxels end where the stream does)."""
    _nifti(tmp_path / "plain.nii", _volume("int16"))
    raw = (tmp_path / "plain.nii").read_bytes()
    comp = bytearray(gzip.compress(raw))
    if damage == "crc":
        comp[-8:-4] = (zlib.crc32(raw) ^ 1).to_bytes(4, "little")
    elif damage == "length":
        comp[-4:] = (len(raw) + 1).to_bytes(4, "little")
    else:
        mid = len(comp) // 2
        comp[mid : mid + 64] = bytes(64)
    (tmp_path / "bad.nii.gz").write_bytes(bytes(comp))
    with pytest.raises(BadInput, match=r"^bad: truncated or corrupt image data \("):
        load_nifti(str(tmp_path / "bad.nii.gz"), "bad")


def test_a_shard_keeps_statistics_of_its_flat_columns_only(tmp_path):
    """The volume's min and max are megabytes: Parquet would compute them per row and drop them."""
    hu = _volume("int16").transpose(2, 1, 0).copy()
    row = {
        "scan_id": "a",
        "group": "g",
        "volume": hu.tobytes(),
        "shape": list(hu.shape),
        "spacing": [1.5, 0.7, 0.7],
        "orientation": "SPL",
        "affine": AFFINE.reshape(-1).tolist(),
        "label_map": bytes(hu.size),
        "content_hash": "0" * 64,
        "stamp": "s",
    }
    with open_shard(str(tmp_path / "s.parquet"), 2) as writer:
        write_row(writer, row)
        write_row(writer, {**row, "scan_id": "b"})
    f = pq.ParquetFile(tmp_path / "s.parquet")
    assert f.schema_arrow == SHARD_SCHEMA and f.num_row_groups == 2
    back = f.read_row_group(1).to_pylist()[0]
    assert back["scan_id"] == "b"
    np.testing.assert_array_equal(volume_of(back), hu)
    group = f.metadata.row_group(0)
    stats = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(group.num_columns)}
    assert stats["scan_id"] and stats["content_hash"] and stats["stamp"]
    assert not stats["volume"] and not stats["label_map"]
    codecs = {group.column(i).path_in_schema: group.column(i).compression for i in range(group.num_columns)}
    assert codecs.pop("volume") == codecs.pop("label_map") == "LZ4" and set(codecs.values()) == {"ZSTD"}
