"""The run's seed drives the data it trains on: the scan order of every pass and each draw's
sampling are functions of train.seed (ctray.data.pipeline); the same seed repeats them exactly, and
another seed changes them. (test_reproducible.py runs the trainer end to end with one seed.)"""

import numpy as np

from ctray.config import StorageConfig
from ctray.data.pipeline import RankDraws, ScanOrder, ShardRowReader
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
