"""The totalfm registry entry: its Objective (ctray.objectives.spec), sweep space and driver-side assets."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ctray.objectives.contrast import BERT_B, anatomy_texts
from ctray.objectives.spec import Assets, Batch, BenchProfile, Objective, SweepSpace
from ctray.objectives.totalfm.clip import TotalFMCLIPTask, clip_assets, synthetic_clip_batch
from ctray.objectives.totalfm.config import TotalFMCLIPConfig, TotalFMMAEConfig
from ctray.objectives.totalfm.mae import TotalFMMAETask, synthetic_batch
from ctray.objectives.totalfm.sampler import OrganSampler

if TYPE_CHECKING:
    from ctray.run_folder import RunFolder

VIDEOMAE_B = (
    "objective.organs.size=[16,160,160]",
    "objective.model.patch_size=16",
    "objective.model.hidden_size=768",
    "objective.model.layers=12",
    "objective.model.heads=12",
    "objective.model.intermediate_size=3072",
)
"""Overrides of the local jobs that build VideoMAE-B on 16x160x160 organ volumes (bench step on a GPU)."""


def organ_sampler(cfg: TotalFMMAEConfig | TotalFMCLIPConfig, assets: Assets, training: bool = True) -> OrganSampler:
    """Training: from the organ cache where prepare() cut one; embedding and evaluation (any shard
    set): cut at every draw."""
    texts = anatomy_texts(cfg, cfg.organs.anatomies, assets, "one") if isinstance(cfg, TotalFMCLIPConfig) else None
    return OrganSampler(cfg.organs, texts, cached=training and assets.organ_cache is not None)


def organ_cache(cfg: TotalFMMAEConfig | TotalFMCLIPConfig, shards: str, run: RunFolder) -> str | None:
    """Driver side: the training shards' organ cache (cut now where missing), or None without one."""
    if not cfg.organs.cache:
        return None
    from ctray.ingest.shardset import ShardSet
    from ctray.objectives.totalfm.organ_cache import ensure_organ_cache

    return ensure_organ_cache(ShardSet.open(shards, run.storage), cfg.organs)


class TotalFMMAE:
    name = "totalfm_mae"
    config = TotalFMMAEConfig
    sweep_space: ClassVar[SweepSpace] = {
        "objective.mask_ratio": {"choice": [0.75, 0.9]},
        "optim.lr": {"loguniform": (1e-4, 1.5e-3)},
    }

    bench = BenchProfile(
        "totalfm-mae-local.yaml",
        (
            *VIDEOMAE_B,
            "objective.model.decoder_hidden_size=384",
            "objective.model.decoder_layers=4",
            "objective.model.decoder_heads=6",
            "objective.model.decoder_intermediate_size=1536",
            "objective.mask_ratio=0.9",
            "objective.organs.margin_mm=10",
            "data.scans_per_batch=16",
        ),
        "target on one H100: >= 1,400 views/s (2x transformers' VideoMAE-B probe, 677)",
        paper_job="totalfm-mae.yaml",
        feed_views_per_s=1400.0,
    )

    def prepare(self, cfg: TotalFMMAEConfig, shards: str, run: RunFolder) -> Assets:
        return Assets(organ_cache=organ_cache(cfg, shards, run))

    def sampler(self, cfg: TotalFMMAEConfig, assets: Assets) -> OrganSampler:
        return organ_sampler(cfg, assets)

    def embed_sampler(self, cfg: TotalFMMAEConfig, assets: Assets) -> OrganSampler:
        return organ_sampler(cfg, assets, training=False)

    def task(self, cfg: TotalFMMAEConfig, assets: Assets) -> TotalFMMAETask:
        return TotalFMMAETask(cfg, assets)

    def synthetic_batch(self, cfg: TotalFMMAEConfig, scans: int, device: torch.device) -> Batch:
        return synthetic_batch(cfg.organs, scans, device)


class TotalFMCLIP:
    name = "totalfm_clip"
    config = TotalFMCLIPConfig
    sweep_space: ClassVar[SweepSpace] = {
        "objective.temperature_init": {"choice": [0.03, 0.07, 0.1]},
        "optim.lr": {"loguniform": (1e-5, 3e-4)},
    }

    bench = BenchProfile(
        "totalfm-clip-local.yaml",
        ("objective.init_from=null", *VIDEOMAE_B, *BERT_B, "objective.embed_dim=256", "data.scans_per_batch=8"),
        paper_job="totalfm-clip.yaml",
        feed_views_per_s=1400.0,  # stage 1's organ volumes/s: the same encoder, and a text tower besides
    )

    def prepare(self, cfg: TotalFMCLIPConfig, shards: str, run: RunFolder) -> Assets:
        return clip_assets(cfg, shards, run).model_copy(update={"organ_cache": organ_cache(cfg, shards, run)})

    def sampler(self, cfg: TotalFMCLIPConfig, assets: Assets) -> OrganSampler:
        return organ_sampler(cfg, assets)

    def embed_sampler(self, cfg: TotalFMCLIPConfig, assets: Assets) -> OrganSampler:
        return organ_sampler(cfg, assets, training=False)

    def task(self, cfg: TotalFMCLIPConfig, assets: Assets) -> TotalFMCLIPTask:
        return TotalFMCLIPTask(cfg, assets)

    def synthetic_batch(self, cfg: TotalFMCLIPConfig, scans: int, device: torch.device) -> Batch:
        return synthetic_clip_batch(cfg, scans, device)


MAE: Objective[TotalFMMAEConfig] = TotalFMMAE()
CLIP: Objective[TotalFMCLIPConfig] = TotalFMCLIP()
