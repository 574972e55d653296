"""The faster data feed equals the plain one: TotalFM's organ cache (cut once by the driver in Ray
tasks) against cutting at every draw, value for value on the same seeds, its identity across
runs, and a purge reaching it; the shards' codecs per column."""

import os

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ctray.config import StorageConfig, load_config
from ctray.data.phantoms import write_dataset
from ctray.data.pipeline import RowGroups, ScanOrder, ShardRowReader, stream_seed
from ctray.data.samplers import WritesInto
from ctray.ingest.derived import PER_SHARD
from ctray.ingest.job import run_ingest
from ctray.ingest.maintain import purge
from ctray.ingest.shardset import ShardSet
from ctray.objectives import get_objective
from ctray.train.config import PretrainConfig

from helpers import PHANTOM_SHAPE, PHANTOM_SPACING, REPO, ingest_cfg


@pytest.fixture(scope="module")
def organ_shards(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("feed")
    data = root / "data"
    write_dataset(str(data), 5, seed=9, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    run_ingest(ingest_cfg(data / "scans", root / "shards", masks=data / "masks", reports=data / "reports.jsonl"))
    return root / "shards"


def _cache_files(shards) -> dict[str, bytes]:
    folder = shards / PER_SHARD
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


def _assert_cache_equals_cutting(spec, cfg, assets, shards) -> int:
    cached, plain = spec.sampler(cfg.objective, assets), spec.embed_sampler(cfg.objective, assets)
    assert cached.key is not None and plain.key is None
    files, rows = RowGroups(pafs.LocalFileSystem()), 0
    for row in ShardSet.open(str(shards), StorageConfig()).scans():
        for seed in (0, 1):
            got = cached(files.sampler_input(cached, row.path, row.row_group), np.random.default_rng(seed))
            want = plain(files.sampler_input(plain, row.path, row.row_group), np.random.default_rng(seed))
            assert got.keys() == want.keys()
            for k in want:
                assert np.array_equal(got[k], want[k]), (row, k)
        rows += int(want["region"].sum() > 0)
    return rows


def test_organ_cache_equals_cutting_at_every_draw_and_follows_a_purge(organ_shards, tmp_path):
    spec = get_objective("totalfm_clip")  # stage 2: the cache's organ volumes beside the shard's texts
    cfg = load_config(
        PretrainConfig,
        REPO / "jobs" / "totalfm-clip-local.yaml",
        [f"data.shards={organ_shards}", f"run.storage={tmp_path}", "run.name=run", "objective.init_from=null"],
    )
    assets = spec.prepare(cfg.objective, cfg.data.shards, cfg.run_folder())
    shard_set = ShardSet.open(str(organ_shards), StorageConfig())
    first = _cache_files(organ_shards)
    assert len(first) == len(shard_set.shards) == 3 and assets.organ_cache is not None
    assert _assert_cache_equals_cutting(spec, cfg, assets, organ_shards) == 5  # every scan has organs to compare

    # Cache identity: another run (here stage 1, the same organ settings) cuts nothing and reads
    # the same bytes; other organ settings get a folder of their own.
    mae = get_objective("totalfm_mae")
    mae_cfg = load_config(PretrainConfig, REPO / "jobs" / "totalfm-mae-local.yaml", [f"data.shards={organ_shards}"])
    assert mae_cfg.objective.organs == cfg.objective.organs
    assert mae.prepare(mae_cfg.objective, str(organ_shards), cfg.run_folder()).organ_cache == assets.organ_cache
    assert _cache_files(organ_shards) == first
    wider = mae_cfg.objective.model_copy(update={"organs": cfg.objective.organs.model_copy(update={"margin_mm": 20})})
    other = mae.prepare(wider, str(organ_shards), cfg.run_folder()).organ_cache
    assert other != assets.organ_cache and len(_cache_files(organ_shards)) == 6

    # A purge rewrites the scan's shard: its organ volumes (the purged pixels) go with it, in
    # every cache; the next run cuts the rewritten shard anew and still equals cutting.
    victim = shard_set.shards[0]
    scan_id = pq.read_table(organ_shards / victim.path, columns=["scan_id"]).column("scan_id")[0].as_py()
    purge(str(organ_shards), StorageConfig(), [scan_id])
    left = _cache_files(organ_shards)
    assert not [name for name in left if victim.shard in name] and len(left) == 4
    assets = spec.prepare(cfg.objective, cfg.data.shards, cfg.run_folder())
    after = _cache_files(organ_shards)
    assert len(after) == 5 and all(after[name] == first[name] for name in left if name in first)
    assert _assert_cache_equals_cutting(spec, cfg, assets, organ_shards) == 4


def test_shards_keep_volume_and_label_map_in_the_bulk_codec(organ_shards, tmp_path):
    """Ingest writes the volume and label map in output.bulk_codec (default lz4), the rest zstd,
    and any codec reads back the same rows."""
    data = organ_shards.parent / "data"
    codecs = {}
    for codec in ("lz4", "none"):
        out = tmp_path / codec
        run_ingest(ingest_cfg(data / "scans", out, f"output.bulk_codec={codec}", masks=data / "masks"))
        path = next(p for p in sorted((out / "shards").glob("*.parquet")) if os.path.getsize(p))
        meta = pq.ParquetFile(path).metadata.row_group(0)
        codecs[codec] = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
        assert (
            codecs[codec]["scan_id"] == "ZSTD"
            and codecs[codec]["anatomy_boxes.list.element.box.list.element"] == "ZSTD"
        )
    assert codecs["lz4"]["volume"] == codecs["lz4"]["label_map"] == "LZ4"
    assert codecs["none"]["volume"] == codecs["none"]["label_map"] == "UNCOMPRESSED"
    tables = [
        pq.read_table(tmp_path / c / "shards", columns=["scan_id", "volume", "label_map"]).sort_by("scan_id")
        for c in ("lz4", "none")
    ]
    assert tables[0].equals(tables[1]) and tables[0].num_rows == 5


@pytest.mark.parametrize(
    "name, job",
    [("ctfm_simclr", "ctfm-local.yaml"), ("totalfm_clip", "totalfm-clip-local.yaml"), ("cagcl", "cagcl-local.yaml")],
)
def test_blocks_written_in_place_equal_each_draw_sampled_alone(organ_shards, tmp_path, name, job):
    """A Ray Data task's block: the samplers write their big arrays straight into the block's rows
    (WritesInto), in arrays the process reuses once nothing holds them (BlockBuffers); the block
    equals each draw sampled alone into arrays of its own, value for value, and a block still held
    is never written over."""
    spec = get_objective(name)
    overrides = [f"data.shards={organ_shards}", f"run.storage={tmp_path}", "run.name=run"]
    if name == "totalfm_clip":
        overrides.append("objective.init_from=null")
    cfg = load_config(PretrainConfig, REPO / "jobs" / job, overrides)
    sampler = spec.sampler(cfg.objective, spec.prepare(cfg.objective, cfg.data.shards, cfg.run_folder()))
    assert isinstance(sampler, WritesInto)
    order = ScanOrder(ShardSet.open(str(organ_shards), StorageConfig()).scans(), seed=3)
    reader = ShardRowReader(str(organ_shards), StorageConfig(), sampler, order, seed=3)
    files = RowGroups(pafs.LocalFileSystem())

    def alone(draws: range) -> dict[str, np.ndarray]:
        outs = []
        for draw in draws:
            path, row_group = order.location(draw)
            rng = np.random.default_rng(stream_seed(3, "sample", draw))
            outs.append(sampler(files.sampler_input(sampler, path, row_group), rng))
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    want = alone(range(4))
    held = reader({"id": np.arange(4)})
    kept = {k: v.copy() for k, v in held.items()}
    again = reader({"id": np.arange(4, 8)})  # another block while the first is held: other arrays
    assert held.keys() == want.keys()
    for k in want:
        assert np.array_equal(held[k], want[k]) and np.array_equal(held[k], kept[k]), k
    assert not any(np.shares_memory(held[k], again[k]) for k in sampler.bulk)
    used = {held[k].ctypes.data for k in sampler.bulk} | {again[k].ctypes.data for k in sampler.bulk}
    del held, again
    reused = reader({"id": np.arange(8, 12)})  # nothing holds those arrays now: other draws, written over them
    assert all(reused[k].ctypes.data in used for k in sampler.bulk)
    want = alone(range(8, 12))
    assert all(np.array_equal(reused[k], want[k]) for k in want)
