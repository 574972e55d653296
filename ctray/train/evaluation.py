"""The task's own evaluation during training (ctray.objectives.spec.Evaluates), on a fixed set of
scans read chunk by chunk at each evaluation."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from ctray import dist
from ctray.data.pipeline import ScanOrder, ShardRowReader, labelled
from ctray.export import embed_sampler
from ctray.ingest.shardset import ShardSet
from ctray.objectives.spec import Assets, Batch, Evaluates
from ctray.train.config import PretrainConfig

log = logging.getLogger(__name__)


class InTrainingEvaluation:
    """The first `eval.max_scans` scans with finding labels (eval.shards, else data.shards), in
    manifest order, sampled with a fixed seed and read chunk by chunk at each evaluation (holding them
    would cost GBs at CA-GCL's input size). Every rank runs it (ZeRO-3 gathers parameters
    collectively); rank 0 publishes the files under <run>/eval/step_N."""

    def __init__(self, cfg: PretrainConfig, assets: Assets, task: Evaluates, device: torch.device):
        self.task, self.device = task, device
        self.run = cfg.run_folder()
        uri = cfg.eval.shards or cfg.data.shards
        # The first scans with finding labels, in manifest order: unlabelled ones score nothing.
        order = ScanOrder(labelled(ShardSet.open(uri, cfg.storage)), seed=None)
        # The sampler `ctray embed` uses (every anatomy with voxels, no augmentation), so that the
        # in-training figures and `ctray eval`'s are of the same inputs.
        sampler = embed_sampler(cfg.objective.name, cfg.objective, assets)
        self.reader = ShardRowReader(uri, cfg.storage, sampler, order, seed=0)
        count, n = min(cfg.eval.max_scans, len(order)), cfg.scans_per_worker
        self.chunks = [np.arange(i, min(i + n, count)) for i in range(0, count, n)]

    def batches(self) -> Iterator[Batch]:
        for draws in self.chunks:
            out = self.reader({"id": draws})
            yield {k: torch.as_tensor(v).to(self.device) for k, v in out.items()}

    def run_at(self, step: int, module: torch.nn.Module) -> dict[str, float]:
        """The evaluation's metrics at `step`; its files in <run>/eval/step_N (rank 0)."""
        module.eval()
        try:
            result = self.task.evaluate(self.batches(), step)
        finally:
            module.train()
        if dist.rank() == 0:
            for name, data in result.files.items():
                self.run.write(f"{self.run.eval_dir(step)}/{name}", data)
            log.info("%s; files %s", result.summary, self.run.uri_of(self.run.eval_dir(step)))
        return result.metrics
