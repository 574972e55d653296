"""Committed shards -> a Ray Data dataset of per-objective training examples.

The dataset streams the run's draws of scans ((shard, row group) pairs: ingest writes one row
group per scan), each pass a seeded permutation of the scans (ScanOrder), and each map task reads
its scan's row group with pyarrow and runs the objective's sampler on it with a generator seeded
by the run's seed and the draw. Measured on a 512x512x300 phantom
(`ctray bench data`): Ray Data's own read_parquet path cost 150-190 ms of CPU per scan against
38 ms for pyarrow reading the same row group, and ordering the index moves no volume bytes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import pyarrow.parquet as pq

from ctray.config import StorageConfig
from ctray.console import quiet_dataset, verbose
from ctray.data.node_cache import NodeCache
from ctray.data.samplers import ReadsBeside, WritesInto
from ctray.ingest.shardset import ScanRow, ShardSet
from ctray.storage import arrow_filesystem

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import ray.data

    from ctray.data.samplers import Sampler


STREAMS = {"order": 0, "sample": 1, "shared": 2, "augment": 3, "shuffle": 4, "embed": 5}
"""The run's independent random streams, each a tag in its seed (so pass k and draw k differ)."""


def stream_seed(seed: int, stream: str, *keys: int) -> int:
    """A 32-bit seed for one of the run's random streams (STREAMS) at `keys` (pass, draw, step, rank)."""
    return int(np.random.SeedSequence([seed, STREAMS[stream], *keys]).generate_state(1)[0])


class ScanOrder:
    """The run's sequence of scan draws, a function of the seed and the manifest: draw k is
    position k % n of pass k // n, and pass p visits the manifest's n scans in a permutation drawn
    from the seed's "order" stream at p. seed None: manifest order every pass (evaluation). A run
    resumed after an ingest added scans continues in the new manifest's order.

    Held as three numpy arrays (the shard paths as bytes, two int32 columns): a million scans in
    62,500 shards are about 11 MiB, which pickle and the object store pass without copying them
    into Python objects."""

    def __init__(self, items: Sequence[ScanRow], seed: int | None):
        paths = sorted({item.path for item in items})
        self.paths = np.array([p.encode() for p in paths], dtype=bytes)
        where = {path: i for i, path in enumerate(paths)}
        self.shard = np.array([where[item.path] for item in items], dtype=np.int32)
        self.row_group = np.array([item.row_group for item in items], dtype=np.int32)
        self.seed = seed
        self._pass: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pass": None}

    def scan(self, draw: int) -> int:
        """Index (in manifest order) of the scan of draw `draw`."""
        n = len(self.shard)
        p, pos = divmod(int(draw), n)
        if self.seed is None:
            return pos
        if self._pass is None or self._pass[0] != p:
            self._pass = (p, np.random.default_rng(stream_seed(self.seed, "order", p)).permutation(n))
        return int(self._pass[1][pos])

    def location(self, draw: int) -> tuple[str, int]:
        """(shard path, row group) of draw `draw`."""
        i = self.scan(draw)
        return self.paths[self.shard[i]].decode(), int(self.row_group[i])


T = TypeVar("T")


class Shared(Generic[T]):
    """A value the driver puts in the object store once, and each process that reads it fetches
    once (the last few stay): every rank's stream carries this reference instead of the value, in
    its dataset's plan (held by its split coordinator on the driver's node) and in each map task.
    The scan order of a million scans is 11 MiB: carried by value, 512 ranks held 5.8 GB of copies
    on the driver's node (`ctray bench scale --ranks`)."""

    KEEP = 4
    _fetched: ClassVar[dict[str, Any]] = {}

    def __init__(self, value: T):
        import ray

        self.ref = ray.put(value)

    def get(self) -> T:
        import ray

        key = self.ref.hex()
        if key not in Shared._fetched:
            Shared._fetched[key] = ray.get(self.ref)
            for old in list(Shared._fetched)[: -self.KEEP]:
                del Shared._fetched[old]
        return Shared._fetched[key]


def shared_value(value: T | Shared[T]) -> T:
    """`value`, or what it refers to in the object store."""
    return value.get() if isinstance(value, Shared) else value


@dataclass(frozen=True)
class RankDraws:
    """Which draws of the run's order one rank samples: row i of its stream is draw
    start + (i // per_rank) * per_step + rank * per_rank + i % per_rank, so each micro-step's
    global batch is the next per_step draws, split over the ranks in rank order."""

    start: int = 0
    """The first draw of the stream (a resumed run: the checkpoint's step x scans per step)."""
    rank: int = 0
    per_rank: int = 1
    """Scans per rank per micro-step."""
    per_step: int = 1
    """Scans per micro-step over all ranks."""

    def draw(self, i: int) -> int:
        return self.start + (i // self.per_rank) * self.per_step + self.rank * self.per_rank + i % self.per_rank


def labelled(shard_set: ShardSet) -> list[ScanRow]:
    """The scans with at least one finding label, in manifest order (only the small `labels`
    column is read)."""
    afs, _ = arrow_filesystem(shard_set.uri, shard_set.storage)
    known: dict[str, list[bool]] = {}
    for path in shard_set.shard_paths():
        column = pq.read_table(path, columns=["labels"], filesystem=afs).column("labels").to_pylist()
        known[path] = [bool(labels) for labels in column]
    return [item for item in shard_set.scans() if known[item.path][item.row_group]]


class RowGroups:
    """A task process's open Parquet files, kept across its draws: opening one reads its footer
    (at least 2 GETs on object storage: at 512 GPUs, more GETs per second than S3 serves per
    prefix, were every draw to reopen its shard). The `keep` most recently read stay open."""

    def __init__(self, fs: pafs.FileSystem, keep: int = 32, cache: NodeCache | None = None):
        self.fs, self.keep, self.cache = fs, keep, cache
        self.files: dict[str, pq.ParquetFile] = {}

    def file(self, path: str) -> pq.ParquetFile:
        f = self.files.pop(path, None) or self._open(path)
        self.files[path] = f  # most recent last
        while len(self.files) > self.keep:
            del self.files[next(iter(self.files))]
        return f

    def _open(self, path: str) -> pq.ParquetFile:
        if self.cache is None:
            return pq.ParquetFile(path, filesystem=self.fs)
        for _ in range(3):  # another process of the node may evict the copy before it is open
            local = self.cache.local(self.fs, path)
            if local is None:
                return pq.ParquetFile(path, filesystem=self.fs)
            try:
                return pq.ParquetFile(local)  # open: an eviction no longer reaches it
            except FileNotFoundError:
                continue
        return pq.ParquetFile(path, filesystem=self.fs)

    def read(self, path: str, row_group: int, columns: list[str]) -> Any:
        return self.file(path).read_row_group(row_group, columns=columns)

    def sources(self, sampler: Sampler, path: str) -> list[tuple[str, tuple[str, ...]]]:
        """The files a draw of `sampler` reads for the shard at `path`, and their columns."""
        if isinstance(sampler, ReadsBeside) and (side := sampler.side_file(path)) is not None:
            return [(side, sampler.side_columns)] + ([(path, tuple(sampler.columns))] if sampler.columns else [])
        return [(path, tuple(sampler.columns))]

    def sampler_input(self, sampler: Sampler, path: str, row_group: int) -> Any:
        """The row group of the scan at (`path`, `row_group`) as `sampler` reads it: its columns,
        and those it reads from a file beside the shard (`side_file`, e.g. TotalFM's organ cache)."""
        tables = [self.read(p, row_group, list(columns)) for p, columns in self.sources(sampler, path)]
        table = tables[-1]
        for extra in tables[:-1]:
            for name in extra.column_names:
                table = table.append_column(name, extra.column(name))
        return table


class ShardRowReader:
    """map_batches UDF: {"id": draw numbers} -> the sampler's output for those draws' scans.

    Each draw is sampled with its own generator (stream "sample" of the seed, at the draw): the
    patches, organ cuts and texts of a draw are the same in every run with that seed, resumed or
    not, whichever task, node or batch samples it."""

    def __init__(
        self,
        uri: str,
        storage: StorageConfig,
        sampler: Sampler,
        order: ScanOrder | Shared[ScanOrder],
        seed: int,
        draws: RankDraws = RankDraws(),
        cache: NodeCache | Shared[NodeCache] | None = None,
    ):
        self.uri, self.storage, self.sampler = uri, storage, sampler
        self.order, self.seed, self.draws, self.cache = order, seed, draws, cache
        self._files: RowGroups | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._files is None:  # built in the task process: filesystems do not travel well
            cache = None if self.cache is None else shared_value(self.cache)
            self._files = RowGroups(arrow_filesystem(self.uri, self.storage)[0], cache=cache)
        order = shared_value(self.order)
        ids = batch["id"]
        writes = self.sampler if isinstance(self.sampler, WritesInto) else None
        bulk = writes.bulk if writes is not None else {}
        block = {k: BLOCK_BUFFERS.take((len(ids), *shape), dtype) for k, (shape, dtype) in bulk.items()}
        outputs = []
        for j, i in enumerate(ids):  # one generator per draw: a draw samples alike in any batch
            draw = self.draws.draw(int(i))
            path, row_group = order.location(draw)
            table = self._files.sampler_input(self.sampler, path, row_group)
            rng = np.random.default_rng(stream_seed(self.seed, "sample", draw))
            if writes is not None:
                rows = {k: v[j : j + 1] for k, v in block.items()}
                out = writes(table, rng, out=rows)
                if any(out.pop(k) is not v for k, v in rows.items()):
                    raise TypeError(f"{type(self.sampler).__name__} did not return the arrays it was handed")
            else:
                out = self.sampler(table, rng)
            outputs.append(out)
        if len(outputs) == 1:  # np.concatenate would only copy
            return {**block, **outputs[0]}
        return {**block, **{k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}}


class BlockBuffers:
    """A process's arrays for the blocks its Ray Data tasks return, reused once nothing else holds
    them (Ray Data copied the last block into the object store and dropped it; an evaluation batch
    that still shares one keeps it): a freshly allocated array costs a page fault per 4 KiB on its
    first write, which on CA-GCL's 120 MB blocks cost as much CPU as the copy itself. At most
    `keep` arrays are kept, the most recently taken: a task process holds about one block's arrays
    (CA-GCL's two, 120 MB) between its tasks."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.arrays: list[np.ndarray] = [np.empty(0)]
        self.idle = self._count(0)  # what nothing else holding it counts, on this interpreter
        self.arrays.clear()

    def _count(self, k: int) -> int:
        a = self.arrays[k]  # the same references in __init__ and take: the list's, `a`'s, the call's
        return sys.getrefcount(a)

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        for k in range(len(self.arrays)):
            a = self.arrays[k]
            # Held only as idle arrays are (no view, Arrow buffer or tensor shares it any more);
            # `a` counts once more here than in _count.
            if a.shape == shape and a.dtype == dtype and self._count(k) == self.idle + 1:
                self.arrays.append(self.arrays.pop(k))
                return a
        a = np.empty(shape, dtype)
        self.arrays.append(a)
        del self.arrays[: -self.keep]
        return a


BLOCK_BUFFERS = BlockBuffers()
"""The process's (a Ray Data task process, or the trainer's evaluation) block arrays."""


class BlockReader:
    """map_batches UDF: {"id": block numbers} -> ShardRowReader's output for the stream rows of
    those blocks (block b: rows b * per_block up to the stream's `length`), as one batch.

    One batch per block, so that each block Ray Data stores is one Arrow chunk: a block of one
    chunk per draw (map_batches with batch_size=1) made the consuming iterator combine the chunks
    of every batch it cut, a copy of every batch in the training process (measured, 30 MB draws:
    6.4 ms per draw of the trainer's CPU, 1.3 ms with one chunk per block). Blocks hold whole
    rank batches (per_block a multiple of the scans per rank per micro-step), so no batch the
    iterator cuts spans two blocks, which it would copy too (with data.shuffle_buffer_scans the
    iterator's shuffle buffer copies every batch whatever the blocks)."""

    def __init__(self, reader: ShardRowReader, per_block: int, length: int):
        self.reader, self.per_block, self.length = reader, per_block, length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [np.arange(b * self.per_block, min((b + 1) * self.per_block, self.length)) for b in batch["id"]]
        return self.reader({"id": np.concatenate(rows)})


@dataclass(frozen=True)
class StreamPlan:
    """Which draws of the run's scan order the training ranks' streams sample."""

    seed: int
    """The run's seed (train.seed): the scan order and every draw's sampling derive from it."""
    steps: int
    """Micro-steps the streams cover."""
    ranks: int = 1
    per_rank: int = 1
    """Scans per rank per micro-step."""
    start: int = 0
    """The first draw (a resumed run: the checkpoint's step x scans per step)."""
    concurrency: int | None = None
    """Ray Data map tasks sampling at once per stream (None: Ray Data decides)."""
    verbose: bool = False
    """Ray Data's own console lines (progress bars, each stream's execution plan): `ctray -v`."""
    node_cache: str | None = None
    """A folder on each node's disk keeping the shards it reads (data.node_cache); None: off."""
    node_cache_bytes: int = 100 * 10**9
    """Most bytes of shards one node's cache keeps."""


def training_datasets(
    uri: str, storage: StorageConfig, sampler: Sampler, plan: StreamPlan
) -> dict[str, ray.data.DataIterator]:
    """One stream per training rank ("train_<rank>"): its share of `plan.steps` micro-steps of the
    run's scan order (ScanOrder) from draw `plan.start` on (RankDraws), sampled, in order. A rank's
    stream depends on nothing but the seed, so every run with that seed feeds every rank the same
    batches, and a resumed run continues where its checkpoint left off. (One split dataset would
    hand its blocks to whichever worker asks first.)

    Each stream is a one-way streaming_split: its dataset runs in a coordinator actor on this
    (the driver's) node, as Ray Train's own split does, not in the training process, where its
    scheduling thread would share the GIL with the training loop."""
    datasets = rank_datasets(ShardSet.open(uri, storage), sampler, plan)
    return {f"train_{rank}": ds.streaming_split(1, equal=False)[0] for rank, ds in enumerate(datasets)}


def rank_datasets(shard_set: ShardSet, sampler: Sampler, plan: StreamPlan) -> list[ray.data.Dataset]:
    """Every rank's dataset (rank_dataset), over one scan order and node cache put in the object
    store once (Shared), not carried by each rank's plan."""
    order = Shared(ScanOrder(shard_set.scans(), plan.seed))
    cache = None
    if plan.node_cache is not None:
        cache = Shared(NodeCache(plan.node_cache, shard_set.digests(), plan.node_cache_bytes))
    uri, storage, numbers = shard_set.uri, shard_set.storage, block_numbers(sampler, plan)
    return [rank_dataset(uri, storage, sampler, plan, order, rank, cache, numbers) for rank in range(plan.ranks)]


def rank_dataset(
    uri: str,
    storage: StorageConfig,
    sampler: Sampler,
    plan: StreamPlan,
    order: ScanOrder | Shared[ScanOrder],
    rank: int,
    cache: NodeCache | Shared[NodeCache] | None = None,
    numbers: ray.data.Dataset | None = None,
) -> ray.data.Dataset:
    """Rank `rank`'s stream (training_datasets) as a dataset: its draws of `order`, sampled, in
    order. `numbers`: block_numbers(sampler, plan), built once for every rank.

    Ray Data's budget leaves out the training workers' CPUs and GPUs without a word from ctray: in
    the Ray ctray requires (2.60), Ray Train registers its workers with Ray Data's autoscaling
    coordinator at high priority, and each dataset's executor gets what they leave (Ray Train's own
    DataConfig sets nothing more). ExecutionOptions.exclude_resources, which ctray set before, is
    deprecated, and subtracted the workers a second time from that share."""
    import ray

    draws = RankDraws(plan.start, rank, plan.per_rank, plan.per_rank * plan.ranks)
    length = plan.steps * plan.per_rank
    per_block = block_draws(sampler, plan.per_rank, length)
    reader = ShardRowReader(uri, storage, sampler, order, plan.seed, draws, cache)
    ds = (numbers or block_numbers(sampler, plan)).map_batches(
        BlockReader(reader, per_block, length),
        batch_size=None,
        batch_format="numpy",
        num_cpus=1,
        compute=None if plan.concurrency is None else ray.data.TaskPoolStrategy(size=plan.concurrency),
    )
    size = getattr(sampler, "draw_bytes", None)
    if size:  # a block Ray Data split would be cut across a rank batch again (BlockReader)
        ds.context.target_max_block_size = max(ds.context.target_max_block_size or 0, 2 * per_block * int(size))
    ds.context.execution_options.preserve_order = True
    quiet_dataset(ds, plan.verbose)
    return ds


def block_numbers(sampler: Sampler, plan: StreamPlan) -> ray.data.Dataset:
    """The block numbers of a rank's stream, one row and one block each (BlockReader expands each
    into its draws): ray.data.range(draws) splits into a handful of blocks whatever its length, so
    each map task would sample a quarter of the run in a row, and with preserve_order the later
    tasks' scans wait in the object store (measured: 5 GB, then spilling, at 20,000 draws). Ray
    Data builds metadata for each block when the dataset is made (46 bytes and 50 us a block:
    `ctray bench scale`): rank_datasets makes it once for all ranks."""
    import ray

    length = plan.steps * plan.per_rank
    blocks = max(1, math.ceil(length / block_draws(sampler, plan.per_rank, length)))
    return ray.data.range(blocks, override_num_blocks=blocks)


TASK_BYTES = 512 * 2**20
"""About what one Ray Data map task samples in a row (block_draws). Each task and block costs Ray
Data CPU whatever it carries (scheduling, the split coordinator, the object store's bookkeeping),
and what a task samples waits in the object store until the ordered stream reaches it. Measured
through the whole pipeline on 2 cores (`ctray bench data`, paired runs in one sitting): CA-GCL's
30 MB draws (uncompressed shards) 33.5 and 30.8 ms CPU per scan at 128 MiB (4 draws a task), 27.0
and 23.8 at 512 MiB (17 draws; the split coordinator's and Ray's own processes' share halved);
TotalFM's 10.6 MB draws 12.1 ms at 128 MiB (12 draws), 10.4 at 512 MiB (32). Earlier, for a
sampler returning nothing, 12.2, 7.7, 4.1 and 2.8 ms per draw at 4, 8, 16 and 32 draws a task."""
MAX_DRAWS_PER_BLOCK = 32
MAX_BLOCKS = 100_000
"""Beyond this many map tasks planning costs more than it saves: longer runs take more draws per block."""


def block_draws(sampler: Sampler, per_rank: int = 1, length: int = 0) -> int:
    """Draws per map task (and per block): TASK_BYTES of the sampler's output (its `draw_bytes`,
    where it says; 16 draws where it does not), at most MAX_DRAWS_PER_BLOCK, as many as keep a
    stream of `length` draws within MAX_BLOCKS; in whole rank batches of `per_rank` (at least one)."""
    size = getattr(sampler, "draw_bytes", None)
    draws = 16 if not size else max(1, min(MAX_DRAWS_PER_BLOCK, TASK_BYTES // int(size)))
    batches = max(1, draws // per_rank, math.ceil(math.ceil(length / MAX_BLOCKS) / per_rank))
    return batches * per_rank


def place_data_actors_here() -> None:
    """Run a one-row dataset in this (the driver's) process. Ray Data creates its cluster-wide
    helper actor (the autoscaling coordinator: detached, 0 CPU) on the node of the first process
    that runs a dataset; with one dataset per training rank that would be a worker node, which the
    actor would then keep from ever scaling down."""
    import ray

    ds = ray.data.range(1)
    quiet_dataset(ds, verbose())
    ds.materialize()
