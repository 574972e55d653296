"""The ctfm registry entry: its Objective (ctray.objectives.spec), sweep space and driver-side assets."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ctray.objectives.ctfm.config import CTFMConfig
from ctray.objectives.ctfm.sampler import PatchSampler
from ctray.objectives.ctfm.sliding import SlidingPatches
from ctray.objectives.ctfm.task import CTFMTask, synthetic_batch
from ctray.objectives.spec import Assets, Batch, BenchProfile, Objective, RecipeConfig, SweepSpace

if TYPE_CHECKING:
    from ctray.run_folder import RunFolder


class CTFMSimCLR:
    name = "ctfm_simclr"
    config = CTFMConfig
    sweep_space: ClassVar[SweepSpace] = {
        "objective.temperature": {"loguniform": (0.05, 0.5)},
        "objective.patches_per_scan": {"choice": [10, 15, 20]},
        "optim.lr": {"loguniform": (3e-5, 3e-4)},
    }

    bench = BenchProfile(
        "ctfm-local.yaml",
        (
            "objective.patches_per_scan=15",
            "objective.patch_size=[32,128,128]",
            "objective.init_filters=32",
            "objective.blocks_down=[1,2,2,4,4]",
            "objective.head_dims=[256,128]",
            "data.scans_per_batch=4",
        ),
        "target on one H100: >= 330 views/s",
        paper_job="ctfm.yaml",
        feed_views_per_s=330.0,
    )

    def prepare(self, cfg: RecipeConfig, shards: str, run: RunFolder) -> Assets:
        return Assets()

    def sampler(self, cfg: CTFMConfig, assets: Assets) -> PatchSampler:
        return PatchSampler(cfg.patches_per_scan, cfg.patch_size, int(cfg.window_hu[0]))

    def embed_sampler(self, cfg: CTFMConfig, assets: Assets) -> SlidingPatches:
        return SlidingPatches(cfg.patch_size, int(cfg.window_hu[0]))

    def task(self, cfg: CTFMConfig, assets: Assets) -> CTFMTask:
        return CTFMTask(cfg, assets)

    def synthetic_batch(self, cfg: CTFMConfig, scans: int, device: torch.device) -> Batch:
        return synthetic_batch(cfg, scans, device)


OBJECTIVE: Objective[CTFMConfig] = CTFMSimCLR()
