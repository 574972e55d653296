"""The run's seed drives the data it trains on: the scan order of every pass and each draw's
sampling are functions of train.seed (ctray.data.pipeline); the same seed repeats them exactly, and
another seed changes them. (test_reproducible.py runs the trainer end to end with one seed.)
Each rank's dataset keeps that order and leaves the console to ctray."""

import dataclasses
import os
import warnings

import numpy as np

from ctray.config import StorageConfig
from ctray.data.pipeline import (
    TASK_BYTES,
    RankDraws,
    ScanOrder,
    ShardRowReader,
    StreamPlan,
    block_draws,
    rank_dataset,
)
from ctray.ingest.shardset import ShardSet
from ctray.objectives import get_objective

from helpers import pretrain_cfg


def _draws(shards, seed: int) -> tuple[list[int], np.ndarray]:
    """The first two passes' scan order, and the CT-FM patches of the first 3 draws."""
    cfg = pretrain_cfg(shards, "unused", "unused")
    index = ShardSet.open(str(shards), StorageConfig()).scans()
    order = ScanOrder(index, seed)
    objective = get_objective("ctfm_simclr")
    reader = ShardRowReader(str(shards), StorageConfig(), objective.sampler(cfg.objective, {}), order, seed)
    return [order.scan(d) for d in range(2 * len(order))], reader({"id": np.arange(3)})["patches"]


def test_the_seed_decides_the_scan_order_and_the_samples(train_shards):
    scans, patches = _draws(train_shards, 0)
    again_scans, again_patches = _draws(train_shards, 0)
    other_scans, other_patches = _draws(train_shards, 1)
    n = len(scans) // 2
    assert sorted(scans[:n]) == sorted(scans[n:]) == list(range(n))  # each pass is a permutation
    assert scans[:n] != scans[n:]  # a new one every pass
    assert scans == again_scans and np.array_equal(patches, again_patches)
    assert scans != other_scans and not np.array_equal(patches, other_patches)


def test_a_resumed_run_on_another_number_of_ranks_draws_where_the_checkpoint_left_off():
    """The draws of each micro-step are the next scans_per_batch of the run's order whatever the
    number of ranks: a run checkpointed at step 5 on 2 ranks and resumed on 1 (or 4) trains on
    the draws the 2-rank run would have, split over its ranks in rank order."""
    per_step, start_step, micro_steps = 4, 5, 3

    def global_batches(ranks: int, start: int) -> list[list[int]]:
        draws = [RankDraws(start, r, per_step // ranks, per_step) for r in range(ranks)]
        batches: list[list[int]] = [[] for _ in range(micro_steps)]
        for d in draws:  # in rank order
            for i in range(micro_steps * d.per_rank):
                batches[i // d.per_rank].append(d.draw(i))
        return batches

    uninterrupted = global_batches(2, 0)
    resumed = {ranks: global_batches(ranks, start_step * per_step) for ranks in (1, 2, 4)}
    assert resumed[1] == resumed[2] == resumed[4]
    assert resumed[2][0] == list(range(start_step * per_step, (start_step + 1) * per_step))
    assert uninterrupted[0] == list(range(per_step))  # and from 0: the same draw numbering


def test_a_ranks_dataset_runs_in_order_and_leaves_the_console_to_ctray(train_shards):
    """rank_dataset: its draws in order (preserve_order), sampled as ShardRowReader samples them;
    no ExecutionOptions.exclude_resources (deprecated: Ray Train reserves its workers through Ray
    Data's autoscaling coordinator, and subtracting them again counted them twice), so building it
    warns nothing; Ray Data's progress bars and execution-plan lines off in the dataset's own
    context (it travels to the split coordinator), unless verbose, and the process's context untouched."""
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    cfg = pretrain_cfg(train_shards, "unused", "unused")
    sampler = get_objective("ctfm_simclr").sampler(cfg.objective, {})
    order = ScanOrder(ShardSet.open(str(train_shards), StorageConfig()).scans(), 0)
    plan = StreamPlan(seed=0, steps=3, ranks=2, concurrency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        quiet = rank_dataset(str(train_shards), StorageConfig(), sampler, plan, order, 1)
        loud = rank_dataset(
            str(train_shards), StorageConfig(), sampler, dataclasses.replace(plan, verbose=True), order, 1
        )
    options = quiet.context.execution_options
    assert options.preserve_order
    assert options.exclude_resources.is_zero() and options.is_resource_limits_default()
    assert not quiet.context.enable_progress_bars and not quiet.context.print_on_execution_start
    current = ray.data.DataContext.get_current()
    assert current.print_on_execution_start  # Ray Data's default, left alone
    assert (loud.context.enable_progress_bars, loud.context.print_on_execution_start) == (
        current.enable_progress_bars,
        current.print_on_execution_start,
    )
    rows = quiet.take_all()  # rank 1 of 2, one scan per micro-step: draws 1, 3, 5
    reader = ShardRowReader(str(train_shards), StorageConfig(), sampler, order, 0, RankDraws(0, 1, 1, 2))
    expected = reader({"id": np.arange(3)})["patches"]
    assert np.array_equal(np.stack([row["patches"] for row in rows]), expected)


def test_each_block_holds_whole_rank_batches_in_one_chunk(train_shards):
    """A rank's stream stores whole rank batches per block, one Arrow chunk each, so the
    training iterator cuts its batches without copying them (BlockReader); the draws are those
    ShardRowReader samples, in order."""
    import ray

    cfg = pretrain_cfg(train_shards, "unused", "unused")
    sampler = get_objective("ctfm_simclr").sampler(cfg.objective, {})
    sampler.draw_bytes = TASK_BYTES // 3  # 3 draws per task, rounded to whole batches of 2
    order = ScanOrder(ShardSet.open(str(train_shards), StorageConfig()).scans(), 0)
    plan = StreamPlan(seed=0, steps=3, ranks=2, per_rank=2, concurrency=1)
    assert block_draws(sampler, plan.per_rank, 6) == 2
    ds = rank_dataset(str(train_shards), StorageConfig(), sampler, plan, order, 0).materialize()
    blocks = [ray.get(ref) for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]
    assert [b.num_rows for b in blocks] == [2, 2, 2]
    assert all(b.column("patches").num_chunks == 1 for b in blocks)
    reader = ShardRowReader(str(train_shards), StorageConfig(), sampler, order, 0, RankDraws(0, 0, 2, 4))
    expected = reader({"id": np.arange(6)})["patches"]
    assert np.array_equal(np.stack([row["patches"] for row in ds.take_all()]), expected)


def test_block_draws_takes_whole_rank_batches_within_the_task_and_block_limits():
    class Big:
        draw_bytes = TASK_BYTES // 4

    assert block_draws(Big()) == 4
    assert block_draws(Big(), per_rank=3) == 3  # 4 draws round to one batch of 3
    assert block_draws(Big(), per_rank=6) == 6  # never less than one batch
    assert block_draws(object()) == 16  # a sampler that does not say its size
    assert block_draws(Big(), length=10**6) == 10  # at most MAX_BLOCKS blocks
    assert block_draws(Big(), per_rank=3, length=10**6) == 12  # still at most, in whole batches


def test_the_ranks_share_one_scan_order_in_the_object_store(train_shards):
    """rank_datasets: every rank's plan carries a reference to the run's scan order (Shared), not
    the order itself (a million scans' order is 11 MiB, held once per rank by its split
    coordinator on the driver's node), and samples what the order by value samples."""
    import ray

    from ctray.data.pipeline import Shared, rank_datasets

    cfg = pretrain_cfg(train_shards, "unused", "unused")
    sampler = get_objective("ctfm_simclr").sampler(cfg.objective, {})
    shard_set = ShardSet.open(str(train_shards), StorageConfig())
    plan = StreamPlan(seed=0, steps=2, ranks=2, per_rank=2, concurrency=1)
    datasets = rank_datasets(shard_set, sampler, plan)
    names = {os.path.basename(p) for p in shard_set.digests()}
    for ds in datasets:
        pickled = ray.cloudpickle.dumps(ds)
        assert not any(name.encode() in pickled for name in names)
    order = ScanOrder(shard_set.scans(), 0)
    shared = Shared(order)
    assert shared.get() is shared.get() and shared.get().location(3) == order.location(3)
    reader = ShardRowReader(str(train_shards), StorageConfig(), sampler, order, 0, RankDraws(0, 1, 2, 4))
    rows = datasets[1].take_all()
    assert np.array_equal(np.stack([row["patches"] for row in rows]), reader({"id": np.arange(4)})["patches"])
