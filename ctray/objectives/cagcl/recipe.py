"""The cagcl registry entry: its Objective (ctray.objectives.spec), sweep space and driver-side assets."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.objectives.anatomy_text import text_assets
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.objectives.cagcl.sampler import AnatomyScanSampler
from ctray.objectives.cagcl.task import CAGCLTask, synthetic_batch
from ctray.objectives.contrast import BERT_B, anatomy_texts
from ctray.objectives.spec import Assets, Batch, BenchProfile, Objective, SweepSpace

if TYPE_CHECKING:
    from ctray.run_folder import RunFolder


def anatomy_labels(cfg: CAGCLConfig, shards: str, storage: StorageConfig) -> dict[str, list[int]]:
    """Label ids of each configured anatomy: the config's, else the anatomy groups the shards were
    ingested with (ShardSet.anatomies)."""
    from ctray.ingest.shardset import ShardSet

    groups = cfg.anatomy_labels or ShardSet.open(shards, storage).anatomies
    missing = [a for a in cfg.anatomies if a not in groups]
    if missing:
        raise ConfigError(f"objective.anatomies {missing} are not anatomy groups of the shards ({sorted(groups)})")
    return {a: list(groups[a]) for a in cfg.anatomies}


def check_vit_init(cfg: CAGCLConfig) -> None:
    """Driver side, before any worker starts: `objective.vit_init` is readable and fits the
    configured ViT, shape for shape (a ViT on the meta device: nothing of the model allocated)."""
    from ctray.objectives.cagcl.task import vit3d
    from ctray.objectives.cagcl.vit_init import vit3d_state

    if cfg.vit_init:
        with torch.device("meta"):
            vit = vit3d(cfg)
        vit3d_state(vit, cfg.vit_init, cfg.vit_init_patch_embed)


def cagcl_assets(cfg: CAGCLConfig, shards: str, run: RunFolder) -> Assets:
    """The run's tokenizer and each anatomy's label ids; `vit_init` checked."""
    check_vit_init(cfg)
    labels = anatomy_labels(cfg, shards, run.storage)
    return text_assets(cfg, shards, run).model_copy(update={"anatomy_labels": labels})


class CAGCL:
    name = "cagcl"
    config = CAGCLConfig
    sweep_space: ClassVar[SweepSpace] = {
        "objective.global_weight": {"grid": [0.0, 0.05, 0.1, 0.2]},
        "optim.lr": {"loguniform": (1e-5, 3e-4)},
    }

    bench = BenchProfile(
        "cagcl-local.yaml",
        (
            "objective.input_size=[112,256,352]",
            "objective.patch=[16,16,32]",
            "objective.width=768",
            "objective.depth=12",
            "objective.heads=12",
            "objective.pool_heads=4",
            "objective.embed_dim=256",
            *BERT_B,
            "objective.text.pooling=cls",
            "data.scans_per_batch=14",
        ),
        "target on one H100: >= 250 TFLOP/s (1.5x the plain SDPA ViT-B probe, 165)",
        paper_job="cagcl.yaml",
        # 250 TFLOP/s over ~1.06 TFLOP per scan: the paper-size model's forward + backward (ViT-B at
        # 112x256x352 and BERT-B over its anatomy texts), as `bench step` counts it on a GPU
        feed_views_per_s=250e12 / 1.06e12,
    )

    def prepare(self, cfg: CAGCLConfig, shards: str, run: RunFolder) -> Assets:
        return cagcl_assets(cfg, shards, run)

    def sampler(self, cfg: CAGCLConfig, assets: Assets, evaluation: bool = False) -> AnatomyScanSampler:
        policy = "clinical_aware" if cfg.text_augmentation else "all"
        texts = anatomy_texts(cfg, cfg.anatomies, assets, policy)
        if assets.anatomy_labels is None:
            raise ValueError("the assets hold no anatomy label ids: the objective's prepare() did not run")
        return AnatomyScanSampler(cfg, assets.anatomy_labels, texts, evaluation)

    def embed_sampler(self, cfg: CAGCLConfig, assets: Assets) -> AnatomyScanSampler:
        """Embedding and evaluation: the training sampler without flips, with every sentence of each
        anatomy's text, a centred crop and every anatomy with voxels in it (not only complete ones).
        One forward pass per scan over the anatomies' region: an organ reaching past the crop is
        embedded from its visible part (fVLM's evaluation crops around each organ instead, one pass
        per organ; ctray keeps one pass: A times cheaper, the same model input as training)."""
        return self.sampler(cfg.model_copy(update={"flip_prob": 0.0, "text_augmentation": False}), assets, True)

    def task(self, cfg: CAGCLConfig, assets: Assets) -> CAGCLTask:
        return CAGCLTask(cfg, assets)

    def synthetic_batch(self, cfg: CAGCLConfig, scans: int, device: torch.device) -> Batch:
        return synthetic_batch(cfg, scans, device)


OBJECTIVE: Objective[CAGCLConfig] = CAGCL()
