"""`ctray embed` on a real local Ray: an export over shards into per-shard Parquet parts that
equal a single-process embedding of each scan, resumable shard by shard."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ctray.config import StorageConfig, load_config
from ctray.data.phantoms import write_dataset
from ctray.data.pipeline import stream_seed
from ctray.data.text import prepare_tokenizer
from ctray.embed import run_embed
from ctray.errors import ConfigError
from ctray.evaluate.config import EvalReportConfig
from ctray.evaluate.run import run_eval
from ctray.export import TrainedOn, load_encoder
from ctray.ingest.maintain import purge
from ctray.ingest.shardset import ShardSet
from ctray.models.config import TextConfig
from ctray.objectives import get_objective
from ctray.objectives.ctfm.sliding import tile_starts
from ctray.train.config import PretrainConfig

from helpers import PHANTOM_SHAPE, PHANTOM_SPACING, REPO, export_to, ingest_cfg, trained_like


@pytest.fixture(scope="session")  # its tests run among the quick and among the slow ones: built once
def labelled_shards(ray_local, tmp_path_factory) -> Path:
    """6 phantoms with masks and reports (finding labels) in 3 shards."""
    from ctray.ingest.job import run_ingest

    root = tmp_path_factory.mktemp("embed")
    write_dataset(str(root / "data"), 6, seed=5, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    data = root / "data"
    run_ingest(ingest_cfg(data / "scans", root / "shards", masks=data / "masks", reports=data / "reports.jsonl"))
    return root / "shards"


def exported(name: str, job: str, shards: Path, root: Path) -> Path:
    """The recipe's task as its local job builds it on these shards (tokenizer, anatomy labels),
    moved off its initialisation, exported as a run trained on them would."""
    cfg = load_config(
        PretrainConfig, REPO / "jobs" / job, [f"data.shards={shards}", f"run.storage={root}", "run.name=run"]
    )
    assets = get_objective(name).prepare(cfg.objective, cfg.data.shards, cfg.run_folder())
    task = trained_like(get_objective(name).task(cfg.objective, assets))
    shard_set = ShardSet.open(str(shards), StorageConfig())
    preprocess = shard_set.ingest.preprocess.model_dump(mode="json")
    trained_on = TrainedOn(str(shards), shard_set.fingerprint, len(shard_set.scans()), preprocess)
    export_to(root / "run" / "export", task, cfg, assets, trained_on=trained_on)
    return root / "run"


def _boxes(shards: Path, embedded) -> list[list[dict]]:
    """The stored anatomy boxes of each embedded scan, in the embeddings' row order."""
    rows = {}
    for path in shards.glob("**/*.parquet"):
        for r in pq.read_table(path, columns=["scan_id", "anatomy_boxes"]).to_pylist():
            rows[r["scan_id"]] = r["anatomy_boxes"] or []
    return [rows[s] for s in embedded.column("scan_id").to_pylist()]


def table(out: Path):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).sort_by("scan_id")


def reference(run: Path, shards: Path, scan_id: str) -> dict[str, np.ndarray]:
    """One scan embedded in this process, without Ray: its shard row, the export's sampler with the
    scan's own seed, Encoder.embed."""
    import zlib

    encoder = load_encoder(str(run))
    for path in sorted(shards.glob("**/*.parquet")):
        rows = pq.read_table(path)
        ids = rows.column("scan_id").to_pylist()
        if scan_id in ids:
            row = rows.slice(ids.index(scan_id), 1)
            rng = np.random.default_rng(stream_seed(0, "embed", zlib.crc32(scan_id.encode())))
            return {k: v.numpy() for k, v in encoder.embed(encoder.sampler()(row, rng)).items()}
    raise KeyError(scan_id)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_embed_ctfm_equals_a_single_process_run_resumes_by_shard_and_follows_a_purge(labelled_shards, tmp_path, caplog):
    labelled_shards = Path(shutil.copytree(labelled_shards, tmp_path / "shards"))  # purged below
    for made in ("_derived", "_tokenizers"):  # what the other tests made of the original
        shutil.rmtree(labelled_shards / made, ignore_errors=True)
    run = exported("ctfm_simclr", "ctfm-local.yaml", labelled_shards, tmp_path)
    out = tmp_path / "emb"
    result = run_embed(str(run), str(labelled_shards), str(out), patches=True)
    parts = sorted(out.glob("part-*.parquet"))
    assert result.scans == 6 and result.parts == len(parts) == 3
    meta = json.loads((out / "embed.json").read_text())
    assert meta["objective"] == "ctfm_simclr" and meta["scans"] == 6 and meta["export"].endswith("export")
    t = table(out)
    emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape == (6, 16) and np.isfinite(emb).all()  # init_filters 4 x 2**2
    # The scan as a grid of 8x32x32 patches covering it, the scan's embedding their mean.
    shape = pq.read_table(sorted(labelled_shards.glob("**/*.parquet"))[0]).column("shape")[0].as_py()
    grid = [len(tile_starts(n, p)) for n, p in zip(shape, (8, 32, 32), strict=True)]
    patch_emb = np.array(t.column("patch_embedding")[0].as_py())
    origins = np.array(t.column("patch_origin")[0].as_py())
    assert patch_emb.shape == (np.prod(grid), 16) and np.allclose(patch_emb.mean(0), emb[0], atol=1e-5)
    assert origins.min(0).tolist() == [0, 0, 0] and (origins.max(0) + np.array([8, 32, 32])).tolist() == shape
    labels = np.stack(t.column("finding_labels").to_numpy(zero_copy_only=False))
    assert labels.shape == (6, len(meta["findings"])) and meta["findings"] and set(np.unique(labels)) <= {0, 1}
    first = t.column("scan_id")[0].as_py()
    ref = reference(run, labelled_shards, first)
    np.testing.assert_allclose(emb[0], ref["embedding"][0], rtol=1e-5, atol=1e-6)

    # Resume: a lost part is redone; the others are not touched.
    kept = {p.name: p.stat().st_mtime_ns for p in parts[1:]}
    parts[0].unlink()
    again = run_embed(str(run), str(labelled_shards), str(out), patches=True)
    assert again.parts == 1 and again.scans == 2
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.parquet"))[1:]} == kept
    assert np.array_equal(np.stack(table(out).column("embedding").to_numpy(zero_copy_only=False)), emb)

    # A purge reaches what was made of the scan, as recorded in the shard set: an evaluation report
    # stops it until told what to do with the report; the embeddings lose the scan's row, the
    # shard-mate's row moves to the new shard's part (so embedding again has nothing to redo); the
    # run whose tokenizer saw the scan's report is named.
    run_eval(EvalReportConfig(embeddings=str(out), bootstrap=20))
    tokenizer_run = tmp_path / "tokenizer-run"
    text = TextConfig(tokenizer_min_patients=1)
    prepare_tokenizer(text, str(labelled_shards), str(tokenizer_run), StorageConfig())
    # Trained once per shard set and settings, kept in it: another run gets the same bytes untrained.
    (shared,) = (labelled_shards / "_tokenizers").glob("*.json")
    with caplog.at_level(logging.INFO, logger="ctray"):
        prepare_tokenizer(text, str(labelled_shards), str(tmp_path / "second-run"), StorageConfig())
    assert "using the shard set's tokenizer" in caplog.text and "training a WordPiece" not in caplog.text
    assert (tmp_path / "second-run" / "tokenizer.json").read_bytes() == shared.read_bytes()
    with pytest.raises(ConfigError, match=r"purge stopped: 1 evaluation report\(s\) were computed with these scans"):
        purge(str(labelled_shards), StorageConfig(), [first])
    assert first in table(out).column("scan_id").to_pylist() and ShardSet.open(str(labelled_shards), StorageConfig())
    done = purge(str(labelled_shards), StorageConfig(), [first], evaluations="delete")
    assert done["evaluations"] == [str(out / "report")] and not (out / "report").exists()
    assert done["embeddings"] == [str(out)]
    assert done["tokenizers"] == sorted([str(tokenizer_run), str(tmp_path / "second-run")])
    assert not list((labelled_shards / "_tokenizers").glob("*.json"))  # trained on the purged report too
    t = table(out)
    ids = t.column("scan_id").to_pylist()
    assert first not in ids and len(ids) == len(set(ids)) == 5 and len(list(out.glob("part-*.parquet"))) == 3
    assert np.array_equal(np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), emb[1:])
    assert json.loads((out / "embed.json").read_text())["scans"] == 5
    after = run_embed(str(run), str(labelled_shards), str(out), patches=True)
    assert after.parts == 0 and after.scans == 0

    # Embeddings a purge did not know of (their record gone): embedding again drops the old shard's
    # part (the purged scan and its shard-mate) and embeds the new shard.
    shutil.rmtree(labelled_shards / "_derived")
    second = ids[-1]  # its shard-mate stays
    assert purge(str(labelled_shards), StorageConfig(), [second])["embeddings"] == []
    after = run_embed(str(run), str(labelled_shards), str(out), patches=True)
    assert after.parts == 1 and after.scans == 1
    ids = table(out).column("scan_id").to_pylist()
    assert second not in ids and len(ids) == len(set(ids)) == 4 and len(list(out.glob("part-*.parquet"))) == 3


def test_embed_volume_from_a_nifti_or_an_array_equals_the_shard_path(labelled_shards, tmp_path):
    """A scan never ingested, embedded straight from its file (or its array, spacing and
    orientation) through the preprocessing export.json recorded, equals the embedding of the same
    scan read from the shards: the export carries its input pipeline."""
    import nibabel as nib

    run = exported("ctfm_simclr", "ctfm-local.yaml", labelled_shards, tmp_path)
    encoder = load_encoder(str(run))
    scan_id = pq.read_table(sorted(labelled_shards.glob("**/*.parquet"))[0]).column("scan_id")[0].as_py()
    nifti = labelled_shards.parent / "data" / "scans" / f"{scan_id}.nii.gz"
    want = reference(run, labelled_shards, scan_id)["embedding"]
    np.testing.assert_allclose(encoder.embed_volume(str(nifti))["embedding"].numpy(), want, rtol=1e-5, atol=1e-6)

    image = nib.as_closest_canonical(nib.load(nifti))  # RAS: axis 0 runs right, 1 anterior, 2 superior
    hu = np.asarray(image.dataobj, dtype=np.float32)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    from_array = encoder.embed_volume(hu, spacing=spacing, orientation="RAS")["embedding"].numpy()
    np.testing.assert_allclose(from_array, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="needs its spacing"):
        encoder.embed_volume(hu)


def test_embed_cagcl_anatomies_and_report_texts(labelled_shards, tmp_path, caplog):
    run = exported("cagcl", "cagcl-local.yaml", labelled_shards, tmp_path)
    out = tmp_path / "emb"
    run_embed(str(run), str(labelled_shards), str(out), batch_scans=3)
    meta = json.loads((out / "embed.json").read_text())
    t = table(out)
    a = len(meta["anatomies"])
    anatomy = np.stack([np.stack(x) for x in t.column("anatomy_embedding").to_pylist()])
    region = np.array(t.column("region").to_pylist())
    present = np.array(t.column("present").to_pylist())
    assert anatomy.shape == (6, a, 32) and region.shape == present.shape == (6, a)
    assert region.any() and present.any() and not (present & ~region).any()
    # Every anatomy with voxels in the scan is embedded, complete or not (fVLM's evaluation): the
    # phantoms' lung and bone touch the scan's border, which training's sampler drops.
    boxes = [{b["anatomy"] for b in row} for row in _boxes(labelled_shards, t)]
    shown = [{a for j, a in enumerate(meta["anatomies"]) if region[i, j]} for i in range(len(boxes))]
    assert shown == [b & set(meta["anatomies"]) for b in boxes], (shown, boxes)
    norms = np.linalg.norm(anatomy, axis=-1)
    assert np.allclose(norms[region], 1, atol=1e-4) and np.all(norms[~region] == 0)
    assert list(meta["findings"]) == list(meta["finding_anatomies"])  # the recipe's zero-shot findings
    assert t.column("group").to_pylist() == t.column("scan_id").to_pylist()  # the shards' groups: one per scan
    assert meta["groups"] == "each scan its own group (its scan id)"
    ref = reference(run, labelled_shards, t.column("scan_id")[2].as_py())
    np.testing.assert_allclose(anatomy[2], ref["anatomy_embedding"][0], rtol=1e-4, atol=1e-5)
    assert torch.tensor(ref["text_embedding"]).shape == (1, a, 32)
    assert meta["dim"] == 32

    # ctray eval over them, with the export's own text tower (loaded from embed.json's export); they
    # are the shards the export trained on, which the report and a warning say.
    with caplog.at_level(logging.WARNING, logger="ctray"):
        result = run_eval(EvalReportConfig(embeddings=str(out), bootstrap=50), load_encoder)
    assert f"eval: no: these are embeddings of the shards the model trained on ({labelled_shards})" in caplog.text
    assert "- held-out: no: these are embeddings" in (out / "report" / "report.md").read_text()
    report = out / "report"
    assert result.report.endswith("report.md") and (report / "report.md").exists()
    assert {"roc.png", "text_similarity.png", "anatomy_tsne.png", "metrics.json", "figures.json"} <= {
        p.name for p in report.iterdir()
    }
    assert 0 <= result.metrics["zs_finding_auroc_mean"] <= 1 and "report" in result.summary

    # Resuming into it with another export is refused in one line.
    other = exported("ctfm_simclr", "ctfm-local.yaml", labelled_shards, tmp_path / "other")
    with pytest.raises(ConfigError, match="holds embeddings made with another export"):
        run_embed(str(other), str(labelled_shards), str(out))


def test_a_part_holds_scans_with_different_patch_counts():
    """Scans of other shapes get other patch grids: one list per scan, read back as written."""
    from ctray.embed import _rows, part_table

    a, b = np.ones((1, 3, 4), np.float32), 2 * np.ones((1, 5, 4), np.float32)
    ragged = _rows([a, b])
    assert ragged.dtype == object and [r.shape for r in ragged] == [(3, 4), (5, 4)]
    rows = [{"scan_id": "s1", "group": "g", "embedding": np.zeros(4, np.float32), "patch_embedding": ragged[0]}]
    rows.append({"scan_id": "s2", "group": "g", "embedding": np.ones(4, np.float32), "patch_embedding": ragged[1]})
    t = part_table(rows, ["embedding", "patch_embedding"])
    assert [np.array(x).shape for x in t.column("patch_embedding").to_pylist()] == [(3, 4), (5, 4)]
    assert np.array(t.column("patch_embedding")[1].as_py()).max() == 2 and t.column("embedding").type.list_size == 4
