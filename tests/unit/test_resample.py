"""Resampling and orientation against reference implementations (a naive per-voxel trilinear
loop, scipy's map_coordinates, and MONAI's Orientation + Spacing on the real CT)."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import ctray.ingest.preprocess
from ctray.data.phantoms import make_phantom, to_axcodes
from ctray.errors import BadInput
from ctray.ingest.config import DicomConfig, PreprocessConfig
from ctray.ingest.dicom import load_series
from ctray.ingest.preprocess import anatomy_boxes, orient, preprocess
from ctray.ingest.volume import RawVolume
from ctray.resample import axis_map, resample_linear, resample_nearest, spacing_shape


def _naive_trilinear(src, spacing_in, spacing_out):
    """One voxel at a time, straight from the definition (MONAI's grid, border clamp)."""
    sizes = zip(src.shape, spacing_in, spacing_out, strict=True)
    shape = [int(np.ceil((n - 1) * si / so - 1e-9)) + 1 for n, si, so in sizes]
    out = np.empty(shape)
    for k in range(shape[0]):
        for j in range(shape[1]):
            for i in range(shape[2]):
                acc = 0.0
                pos = []
                for idx, n, si, so in zip((k, j, i), src.shape, spacing_in, spacing_out, strict=False):
                    p = min(max(idx * so / si, 0.0), n - 1)
                    lo = int(np.floor(p))
                    pos.append((lo, min(lo + 1, n - 1), p - lo))
                for dz in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            w = 1.0
                            ix = []
                            for d, (lo, hi, f) in zip((dz, dy, dx), pos, strict=False):
                                w *= f if d else 1 - f
                                ix.append(hi if d else lo)
                            acc += w * src[tuple(ix)]
                out[k, j, i] = acc
    return out


def test_trilinear_matches_naive_loop():
    rng = np.random.default_rng(0)
    src = rng.integers(-1000, 2000, size=(7, 9, 11)).astype(np.int16)
    spacing_in, spacing_out = (1.0, 0.7, 0.7), (3.0, 1.0, 1.3)
    maps = tuple(axis_map(n, a, b) for n, a, b in zip(src.shape, spacing_in, spacing_out, strict=False))
    got = resample_linear(src, maps)
    want = _naive_trilinear(src.astype(np.float64), spacing_in, spacing_out)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 0.5 + 1e-3  # int16 rounding only


def test_slope_intercept_and_strided_input():
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 3000, size=(12, 10, 8)).astype(np.uint16)
    maps = tuple(axis_map(n, 1.0, 2.0) for n in stored.shape)
    scaled = resample_linear(stored, maps, slope=1.0, inter=-1024.0)
    direct = resample_linear(stored.astype(np.float32) - 1024.0, maps)
    assert np.abs(scaled.astype(int) - direct).max() <= 1
    # a transposed, flipped view (as orientation produces) gives the same result as a copy
    view = stored.transpose(2, 1, 0)[::-1]
    maps_v = tuple(axis_map(n, 1.0, 1.5) for n in view.shape)
    assert np.array_equal(resample_linear(view, maps_v), resample_linear(np.ascontiguousarray(view), maps_v))


def test_nearest_matches_scipy_on_labels():
    labels = np.random.default_rng(2).integers(0, 5, size=(9, 13, 17)).astype(np.uint8)
    maps = tuple(axis_map(n, 1.0, 0.5) for n in labels.shape)  # upsampling: every input voxel repeats
    got = resample_nearest(labels, maps)
    coords = np.meshgrid(
        *[np.clip(np.floor(np.arange(m.size) * 0.5 + 0.5), 0, n - 1) for m, n in zip(maps, labels.shape, strict=True)],
        indexing="ij",
    )
    want = ndimage.map_coordinates(labels, coords, order=0)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "ILA"])
def test_any_stored_orientation_comes_back_identical(axcodes):
    p = make_phantom("o", 3, shape=(16, 40, 40), spacing=(3.0, 2.0, 2.0))
    data, affine = to_axcodes(p.hu, p.affine, axcodes)
    labels, _ = to_axcodes(p.labels, p.affine, axcodes)
    cfg = PreprocessConfig(spacing=p.spacing, crop_foreground=False)
    out = preprocess(RawVolume(data, affine, source="s"), RawVolume(labels, affine, source="m"), cfg)
    assert np.array_equal(out.hu, p.hu)
    assert np.array_equal(out.labels, p.labels)
    assert np.allclose(out.affine, p.affine)


def test_dicom_series_reads_like_the_array(tmp_path):
    from ctray.data.phantoms import write_dicom_series

    p = make_phantom("d", 4, shape=(10, 32, 24), spacing=(2.5, 1.5, 1.25))
    write_dicom_series(str(tmp_path / "d"), p)
    files = sorted(str(f) for f in (tmp_path / "d").iterdir())[::-1]  # order on disk must not matter
    raw = load_series(files, "d", DicomConfig())
    out = preprocess(raw, None, PreprocessConfig(spacing=p.spacing, crop_foreground=False))
    assert np.array_equal(out.hu, p.hu)
    assert np.allclose(out.affine, p.affine, atol=1e-4)


def test_anatomy_boxes_match_the_label_map():
    p = make_phantom("b", 5, shape=(24, 48, 48), spacing=(3.0, 2.0, 2.0))
    boxes = {b["anatomy"]: b for b in anatomy_boxes(p.labels, {"liver": [5], "kidney": [2, 3, 23, 24], "absent": [90]})}
    assert "absent" not in boxes
    for name, ids in (("liver", [5]), ("kidney", [2, 3, 23, 24])):
        where = np.argwhere(np.isin(p.labels, ids))
        assert boxes[name]["box"] == [*where.min(0).tolist(), *(where.max(0) + 1).tolist()]
        assert boxes[name]["voxels"] == len(where)


def test_matches_monai_orientation_spacing_on_real_ct(shared_data):
    """MONAI's chain (what CT-FM runs each step) and ctray agree on the real CT."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    path = str(shared_data / "ct" / "example_ct_sm.nii.gz")
    spacing = (3.0, 1.5, 1.5)
    monai = Compose(
        [LoadImage(image_only=True), EnsureChannelFirst(), Orientation("SPL"), Spacing(pixdim=spacing, mode="bilinear")]
    )(path)[0].numpy()
    img = nib.load(path)
    raw = RawVolume(
        np.asanyarray(img.dataobj.get_unscaled()), img.affine, float(img.dataobj.slope), float(img.dataobj.inter), "ct"
    )
    ours = preprocess(raw, None, PreprocessConfig(spacing=spacing, crop_foreground=False)).hu
    assert ours.shape == monai.shape
    diff = np.abs(ours.astype(np.float64) - monai)
    assert diff.max() <= 0.5 + 1e-2, diff.max()  # same grid and weights: int16 rounding only


def test_orient_is_a_view():
    data = np.zeros((5, 6, 7), dtype=np.int16)
    view, _ = orient(data, np.diag([1.0, 1.0, 1.0, 1.0]), "SPL")
    assert view.base is not None and np.shares_memory(view, data)


def test_a_resampled_grid_over_max_voxels_is_refused_before_it_is_allocated(monkeypatch):
    """pixdim 100x too large: 25,600 voxels in the file, 2.3e10 at the target spacing (46 GB of
    int16). The input passes max_voxels; its resampled grid is refused before resampling starts."""

    def resampling_started(*args, **kwargs):
        raise AssertionError("resampling started")

    monkeypatch.setattr(ctray.ingest.preprocess, "resample_linear", resampling_started)
    p = make_phantom("s", 3, shape=(16, 40, 40), spacing=(3.0, 2.0, 2.0))
    stretched = p.affine.copy()
    stretched[:3, :3] *= 100
    scan = RawVolume(p.hu, stretched, source="scan0042")
    with pytest.raises(BadInput) as err:
        preprocess(scan, RawVolume(p.labels, stretched, source="m"), PreprocessConfig(spacing=(3.0, 2.0, 2.0)))
    assert str(err.value) == (
        "scan0042: 16x40x40 voxels of 300x200x200 mm resample to 1501x3901x3901 = 22841919301 voxels at 3x2x2 mm,"
        " more than preprocess.max_voxels=536870912"
    )


def test_max_voxels_bounds_the_resampled_grid_exactly():
    p = make_phantom("e", 3, shape=(8, 12, 10), spacing=(3.0, 2.0, 2.0))
    scan = RawVolume(p.hu, p.affine, source="e")
    out = spacing_shape(p.hu.shape, np.array(p.spacing), (1.5, 1.0, 1.0))
    assert out == (15, 23, 19)  # upsampled: more voxels than the input's 960
    exact = 15 * 23 * 19
    cfg = PreprocessConfig(spacing=(1.5, 1.0, 1.0), crop_foreground=False, max_voxels=exact)
    assert preprocess(scan, None, cfg).hu.shape == out
    with pytest.raises(BadInput, match=f"= {exact} voxels at 1.5x1x1 mm, more than preprocess.max_voxels={exact - 1}$"):
        preprocess(scan, None, cfg.model_copy(update={"max_voxels": exact - 1}))
