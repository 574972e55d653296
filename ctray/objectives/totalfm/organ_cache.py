"""TotalFM's organ volumes, cut once per shard set instead of at every draw.

An organ volume (its stored box plus the margin, resampled to the video size, windowed:
OrganSampler.organ) draws nothing at random, yet cutting it from the whole scan at every draw cost
28 ms of CPU per scan (7 organs at 16x160x160) plus reading the whole volume: 15 cores per GPU at
TotalFM's target (`ctray bench data --objective totalfm_mae`). So the driver cuts them once, one
cache file per shard, under <shard set>/_per_shard/organs/<key>/<shard>.parquet: one row group per scan in
the shard's row order, the organ volumes as the sampler returns them (float16) and which organs
have a box. The key hashes the settings that shape the volumes (organs, size, margin, window) and
ORGAN_CUT_VERSION, so other settings get files of their own. A rewritten shard (`ctray purge`)
has a new name, so it is never served from the old file, and purge removes the old files (they
hold the purged scan's pixels). The whole volume stays in the shards:
evaluation crops around each organ from it.

numpy and pyarrow only: the training sampler reads these files in Ray Data's task processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctray.data.samplers import binary_column

if TYPE_CHECKING:
    from ctray.config import StorageConfig
    from ctray.ingest.shardset import Shard, ShardSet
    from ctray.objectives.totalfm.config import OrganInput

log = logging.getLogger(__name__)

ORGAN_CACHE = "organs"
"""The kind of per-shard cache (ctray.ingest.derived.PER_SHARD) the organ volumes are."""
ORGAN_CUT_VERSION = 1
"""Bump when OrganSampler.organ changes what it returns: every cache is then cut anew."""
CACHE_SCHEMA = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("organs", pa.large_binary(), nullable=False),  # float16 (A, T, H, W) in [0, 1]
        pa.field("organ_boxes", pa.binary(), nullable=False),  # uint8 (A,): 1 where the organ has a box
    ]
)
CACHE_COLUMNS = ("organs", "organ_boxes")


def cache_key(organs: OrganInput) -> str:
    """The settings that shape the organ volumes, hashed."""
    shape = {
        "anatomies": list(organs.anatomies),
        "size": list(organs.size),
        "margin_mm": organs.margin_mm,
        "window_hu": list(organs.window_hu),
        "version": ORGAN_CUT_VERSION,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def cache_file(shard: Shard) -> str:
    """A shard's cache file name: the shard's own file name. Shard names are never reused for other
    content (ingest names a shard by its scans and their listing stamps, a rewrite by what it
    dropped), so a cache file is current for as long as its shard is in the manifest."""
    return posixpath.basename(shard.path)


def cached_shard(path: str) -> str:
    """The shard name a cache file was cut from (cache_file's inverse)."""
    return posixpath.basename(path).removesuffix(".parquet")


def _cut_shard(src: str, dst: str, organs: OrganInput, storage: StorageConfig) -> int:
    """Ray task: cut every scan's organ volumes of shard `src` into cache file `dst`."""
    from ctray.data.samplers import small_columns, volumes
    from ctray.objectives.totalfm.sampler import OrganSampler
    from ctray.storage import arrow_filesystem, filesystem, publish_file

    afs, src_path = arrow_filesystem(src, storage)
    sampler = OrganSampler(organs)
    source = pq.ParquetFile(src_path, filesystem=afs)
    with tempfile.TemporaryDirectory(prefix="ctray-organs-") as tmp:
        local = os.path.join(tmp, "cache.parquet")
        with pq.ParquetWriter(local, CACHE_SCHEMA, compression="lz4", use_dictionary=False) as out:
            for i in range(source.num_row_groups):
                table = source.read_row_group(i, columns=["scan_id", *sampler.cut_columns])
                cut = sampler.cut(volumes(table)[0], small_columns(table, sampler.cut_columns)[0])
                row = {
                    "scan_id": table.column("scan_id")[0].as_py(),
                    "organs": cut["organs"].tobytes(),
                    "organ_boxes": cut["region"].astype(np.uint8).tobytes(),
                }
                out.write_table(pa.Table.from_pylist([row], schema=CACHE_SCHEMA))
        fs, dst_path = filesystem(dst, storage)
        publish_file(local, fs, dst_path, storage)
    return source.num_row_groups


def ensure_organ_cache(shard_set: ShardSet, organs: OrganInput) -> str:
    """The organ cache folder of `shard_set` for `organs`, with a file for every shard (cut now,
    in Ray tasks, where missing)."""
    import ray

    from ctray.ingest.derived import per_shard_folder
    from ctray.storage import filesystem, join, list_files

    key = cache_key(organs)
    fs, root = filesystem(shard_set.uri, shard_set.storage)
    uri = per_shard_folder(shard_set.uri, ORGAN_CACHE, key)
    have = {
        posixpath.basename(p)
        for p in list_files(fs, per_shard_folder(root, ORGAN_CACHE, key), shard_set.storage, ".parquet")
    }
    todo = [s for s in shard_set.shards if cache_file(s) not in have]
    if not todo:
        return uri
    started = time.time()
    log.info("cutting the organ volumes of %d shard(s) once, into %s", len(todo), uri)
    cut = ray.remote(num_cpus=1)(_cut_shard)
    pending = [
        cut.remote(join(shard_set.uri, s.path), join(uri, cache_file(s)), organs, shard_set.storage) for s in todo
    ]
    scans = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        scans += ray.get(ready[0])
        done, elapsed = len(todo) - len(pending), time.time() - started
        log.info("organ volumes: %d/%d shards, %d scans (%.0f s)", done, len(todo), scans, elapsed)
    return uri


def organ_arrays(batch: Any, anatomies: int, size: tuple[int, int, int]) -> list[dict[str, np.ndarray]]:
    """Each row's cached organ volumes ("organs", (A, T, H, W) float16, a view of the batch's
    buffer) and which organs have a box ("region", (A,) bool), from a pyarrow batch or a dict of columns."""
    organs, boxes = binary_column(batch, "organs", np.float16), binary_column(batch, "organ_boxes", np.uint8)
    rows = []
    for o, b in zip(organs, boxes, strict=True):
        if o is None or b is None:  # the cache's columns are not nullable: not a file this module wrote
            raise ValueError("an organ cache row without its organ volumes: rerun without objective.organs.cache")
        rows.append({"organs": o.reshape(anatomies, *size), "region": b.astype(bool)})
    return rows
