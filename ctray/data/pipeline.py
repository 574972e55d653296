"""Committed shards -> a Ray Data dataset of per-objective training examples."""

from __future__ import annotations

import json
import posixpath

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.storage import arrow_filesystem, filesystem, read_bytes


def shard_paths(uri: str, storage: StorageConfig) -> list[str]:
    """Paths (inside the arrow filesystem) of the shards the manifest lists."""
    fs, root = filesystem(uri, storage)
    try:
        manifest = json.loads(read_bytes(fs, posixpath.join(root, "manifest.json"), storage))
    except FileNotFoundError:
        raise ConfigError(f"{uri} has no manifest.json; run `ctray ingest` first") from None
    _, arrow_root = arrow_filesystem(uri, storage)
    paths = [posixpath.join(arrow_root, s["path"]) for s in manifest["shards"]]
    if not paths:
        raise ConfigError(f"{uri}: the manifest lists no shards")
    return paths


def training_dataset(uri: str, storage: StorageConfig, sampler, concurrency: int | None):
    """read_parquet (shard order shuffled each epoch, only the columns the sampler reads) ->
    CPU map_batches(sampler). One scan per sampler call keeps the memory of a task to one scan."""
    import ray

    afs, _ = arrow_filesystem(uri, storage)
    ds = ray.data.read_parquet(shard_paths(uri, storage), filesystem=afs, shuffle="files").select_columns(list(sampler.columns))
    return ds.map_batches(sampler, batch_size=1, batch_format="numpy", zero_copy_batch=True, num_cpus=1, concurrency=concurrency)
