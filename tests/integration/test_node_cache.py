"""The node-local shard cache (data.node_cache, ctray.data.node_cache): on a real multi-node Ray
(ray.cluster_utils.Cluster, whose nodes share this machine's disk, so each is labelled with its
cache key), each node fetches each shard once, however many of its tasks read it, keeps the
manifest's bytes, samples exactly what reading storage samples, and a node restarted with the same
key reads its copies without fetching them again. Also through a rank's Ray Data stream, and the
eviction of the least recently read copies."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ctray.config import StorageConfig
from ctray.data.node_cache import NODE_LABEL, NodeCache, fetched
from ctray.data.pipeline import RankDraws, ScanOrder, ShardRowReader, StreamPlan, rank_dataset
from ctray.ingest.shardset import ShardSet
from ctray.objectives import get_objective

from helpers import free_port, pretrain_cfg

DRAWS = 6


def _reader(shards: str, cache: NodeCache | None, rank: int = 0) -> ShardRowReader:
    cfg = pretrain_cfg(shards, "unused", "unused")
    sampler = get_objective("ctfm_simclr").sampler(cfg.objective, {})
    order = ScanOrder(ShardSet.open(shards, StorageConfig()).scans(), seed=5)
    return ShardRowReader(shards, StorageConfig(), sampler, order, 5, RankDraws(0, rank, DRAWS, 2 * DRAWS), cache)


def _on_cluster(shards: str, folder: str, out: str) -> None:
    """In a process of its own (the tests' session Ray stays as it is): a head without CPUs and
    two labelled nodes; each node runs two tasks at once that read every shard through the cache;
    then node "a" is removed and started again with its key, and samples once more."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Cluster publishes its address in /tmp/ray/ray_current_cluster, where any later `ray.init()`
    # without an address (this suite's other processes) would find it, or its stale address once
    # it is gone; this driver names the address itself.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": False},
    )
    nodes = {key: cluster.add_node(num_cpus=2, labels={NODE_LABEL: key}) for key in ("a", "b")}
    ray.init(address=cluster.address, log_to_driver=False)
    cache = NodeCache(folder, ShardSet.open(shards, StorageConfig()).digests())

    @ray.remote(num_cpus=1)
    def sample(rank: int) -> dict:
        return _reader(shards, cache, rank)({"id": np.arange(DRAWS)})

    def on(node, rank: int):
        where = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
        return sample.options(scheduling_strategy=where).remote(rank)

    results = {key: ray.get([on(node, 0), on(node, 1)]) for key, node in nodes.items()}
    logs = fetched(folder)
    cluster.remove_node(nodes["a"])
    again = cluster.add_node(num_cpus=2, labels={NODE_LABEL: "a"})
    results["a again"] = [ray.get(on(again, 0))]
    np.savez(out + ".npz", **{f"{k}|{i}": r["patches"] for k, rs in results.items() for i, r in enumerate(rs)})
    with open(out + ".json", "w") as f:
        json.dump({"before": logs, "after": fetched(folder)}, f)
    ray.shutdown()
    cluster.shutdown()


def test_each_node_fetches_each_shard_once_and_keeps_it_across_a_restart(train_shards, tmp_path):
    shards, folder, out = str(train_shards), str(tmp_path / "cache"), str(tmp_path / "result")
    code = f"import test_node_cache as t; t._on_cluster({shards!r}, {folder!r}, {out!r})"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # This module and the tests' helpers, for the driver and the nodes' workers (its tasks' code)
    here = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    env["PYTHONPATH"] = os.pathsep.join([*here, *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    digests = ShardSet.open(shards, StorageConfig()).digests()
    logs = json.loads(Path(out + ".json").read_text())
    for key in ("a", "b"):  # two tasks at once on each node: every shard fetched, and once
        got = [f["file"] for f in logs["before"][key]]
        assert sorted(got) == sorted(f"{d}.parquet" for d in set(digests.values())), key
    assert logs["after"] == logs["before"]  # node "a" started again: it fetched nothing
    for key in ("a", "b"):  # the copies are the manifest's bytes
        for digest in digests.values():
            copy = Path(folder) / key / f"{digest}.parquet"
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest

    samples = np.load(out + ".npz")
    want = [_reader(shards, None, rank)({"id": np.arange(DRAWS)})["patches"] for rank in (0, 1)]
    for name in samples.files:  # the same patches as reading storage, on every node and after the restart
        key, rank = name.split("|")
        assert np.array_equal(samples[name], want[int(rank)]), name


def test_a_ranks_stream_reads_through_the_node_cache(train_shards, tmp_path):
    """StreamPlan.node_cache reaches the stream's tasks: the node (here, unlabelled: its host
    name) fetches each shard it samples once, and the stream samples what it samples without."""
    shards = str(train_shards)
    reader = _reader(shards, None)
    plan = StreamPlan(seed=5, steps=2, ranks=2, per_rank=DRAWS, concurrency=1, node_cache=str(tmp_path / "c"))
    rows = rank_dataset(shards, StorageConfig(), reader.sampler, plan, reader.order, 0, None).take_all()
    assert not (tmp_path / "c").exists()  # no cache given: none made
    cache = NodeCache(str(tmp_path / "c"), ShardSet.open(shards, StorageConfig()).digests())
    rows = rank_dataset(shards, StorageConfig(), reader.sampler, plan, reader.order, 0, cache).take_all()
    (node,) = fetched(str(tmp_path / "c")).values()
    got = [f["file"] for f in node]
    assert len(got) == len(set(got)) >= 1 and set(got) <= {f"{d}.parquet" for d in cache.digests.values()}
    want = _reader(shards, None)({"id": np.arange(2 * DRAWS)})["patches"]
    assert np.array_equal(np.stack([row["patches"] for row in rows]), want)


def test_the_node_cache_keeps_the_most_recently_read_copies_within_its_size(train_shards, tmp_path):
    from pyarrow import fs as pafs

    digests = ShardSet.open(str(train_shards), StorageConfig()).digests()
    paths = sorted(digests)
    size = max(os.path.getsize(p) for p in paths)
    cache = NodeCache(str(tmp_path), digests, max_bytes=2 * size)
    local = pafs.LocalFileSystem()
    first = cache.local(local, paths[0])
    cache.local(local, paths[1])
    os.utime(first, (1, 1))  # read longest ago
    cache.local(local, paths[2])  # a third does not fit: the least recently read copy goes
    kept = {p.name for p in Path(cache.root()).glob("*.parquet")}
    assert kept == {f"{digests[p]}.parquet" for p in paths[1:3]}
    assert cache.local(local, str(tmp_path / "not-a-shard.parquet")) is None  # read from storage


def test_a_file_cut_from_a_shard_is_cached_under_the_shards_digest(tmp_path):
    """A file cut from a shard (TotalFM's organ cache) is cached too, named by its path and the
    shard's digest: once a purge rewrites the shard, its file cut anew is fetched anew, not served
    from the copy that held the purged scan."""
    from pyarrow import fs as pafs

    side = tmp_path / "set" / "_per_shard" / "organs" / "k1" / "part-a.parquet"
    side.parent.mkdir(parents=True)
    side.write_bytes(b"cut before the purge")
    shard = str(tmp_path / "set" / "shards" / "part-a.parquet")
    before = NodeCache(str(tmp_path / "c"), {shard: "1" * 64}).local(pafs.LocalFileSystem(), str(side))
    side.write_bytes(b"cut after the purge")
    after = NodeCache(str(tmp_path / "c"), {shard: "2" * 64}).local(pafs.LocalFileSystem(), str(side))
    assert before is not None and after is not None and before != after
    assert Path(after).read_bytes() == b"cut after the purge"
    assert Path(before).read_bytes() == b"cut before the purge"
