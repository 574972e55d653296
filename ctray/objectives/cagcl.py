"""CA-GCL: cross-anatomy global-local contrastive learning with clinical-aware text augmentation
(papers/cagcl-cross-anatomy-global-local.txt, Sec. 2.1-2.3; anatomy pooling as in fVLM,
alibaba-damo-academy/fvlm).

Vision: a 3D ViT over the whole scan (fVLM: 112x256x352, patch 16x16x32); per anatomy, its mask
max-pooled to the token grid selects tokens, a learnable query attends to them through one shared
multi-head attention, a per-anatomy Linear projects, L2 normalisation (V_ij). Text: the
anatomy-level report, clinically augmented (random non-empty subset of its sentences, shuffled),
through a BERT-style encoder, [CLS] -> projection (R_ij). Loss (eq. 5): sum over anatomies of the
local loss (eq. 1) + lambda * the global loss over synthetic cross-anatomy groups (eq. 2-4).
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Literal

import torch
from pydantic import Field

from ctray.config import StorageConfig
from ctray.data.phantoms import FINDINGS
from ctray.data.samplers import AnatomyScanSampler
from ctray.models.vit import AnatomyQueryPooling, ViT3D
from ctray.objectives.anatomy_text import AnatomyTextTask, ContrastConfig, anatomy_texts, synthetic_text_fields, text_assets
from ctray.objectives.losses import CrossAnatomyGlobalLoss


class CAGCLConfig(ContrastConfig):
    """CA-GCL (defaults: the paper / fVLM)."""

    name: Literal["cagcl"] = "cagcl"
    anatomies: list[str] = Field(default_factory=lambda: sorted(set(FINDINGS.values())))
    """Anatomies (names of the ingest config's anatomy groups) with a query and a text each."""
    anatomy_labels: dict[str, list[int]] = Field(default_factory=dict)
    """Anatomy -> TotalSegmentator label ids; empty: read from the shards' manifest (the ingest
    config's anatomy groups)."""
    input_size: tuple[int, int, int] = (112, 256, 352)
    """Scan resized to this (z, y, x) (fVLM: 112x256x352)."""
    patch: tuple[int, int, int] = (16, 16, 32)
    """ViT patch (z, y, x) (fVLM: 16x16x32 -> 7x16x11 = 1232 tokens)."""
    window_hu: tuple[float, float] = (-1000.0, 1000.0)
    """HU range mapped to 0..1."""
    width: int = 768
    """ViT width (ViT-B: 768)."""
    depth: int = 12
    """ViT blocks (ViT-B: 12)."""
    heads: int = 12
    """ViT attention heads (ViT-B: 12)."""
    pool_heads: int = 4
    """Heads of the shared anatomy query attention (fVLM: 4)."""
    global_weight: float = 0.1
    """lambda of eq. (5); 0 trains the local loss only (the paper's fine-grained VLP baseline)."""
    text_augmentation: bool = True
    """Clinical-aware text augmentation (Sec. 2.3); off: all sentences in report order."""
    seed: int = 0
    """Seed of the global loss's permutations (the same on every worker)."""


def anatomy_labels(cfg: CAGCLConfig, shards: str, storage: StorageConfig) -> dict[str, list[int]]:
    """Label ids of each configured anatomy: the config's, else the ingest config in the manifest."""
    from ctray.ingest.anatomy import anatomy_label_ids
    from ctray.storage import filesystem, read_bytes

    if cfg.anatomy_labels:
        groups = cfg.anatomy_labels
    else:
        fs, root = filesystem(shards, storage)
        manifest = json.loads(read_bytes(fs, posixpath.join(root, "manifest.json"), storage))
        groups = anatomy_label_ids(manifest["config"]["preprocess"]["anatomies"])
    missing = [a for a in cfg.anatomies if a not in groups]
    if missing:
        raise ValueError(f"objective.anatomies {missing} are not anatomy groups of the shards ({sorted(groups)})")
    return {a: list(groups[a]) for a in cfg.anatomies}


def cagcl_assets(cfg) -> dict:
    return {**text_assets(cfg), "anatomy_labels": anatomy_labels(cfg.objective, cfg.data.shards, cfg.storage)}


def scan_sampler(cfg: CAGCLConfig, assets: dict, seed: int | None = None) -> AnatomyScanSampler:
    policy = "clinical_aware" if cfg.text_augmentation else "all"
    texts = anatomy_texts(cfg, cfg.anatomies, assets, policy)
    return AnatomyScanSampler(assets["anatomy_labels"], tuple(cfg.input_size), tuple(cfg.patch), tuple(cfg.window_hu), texts, seed)


def synthetic_batch(cfg: CAGCLConfig, scans: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = len(cfg.anatomies)
    tokens = math.prod(s // p for s, p in zip(cfg.input_size, cfg.patch))
    batch = {
        "scan": torch.rand((scans, *cfg.input_size), generator=gen).half(),
        "anatomy_tokens": (torch.rand((scans, a, tokens), generator=gen) < 0.2).to(torch.uint8),
        **synthetic_text_fields(cfg, scans, a, gen),
    }
    return {k: v.to(device) for k, v in batch.items()}


class CAGCLTask(AnatomyTextTask):
    """Batch {"scan": (S, D, H, W) float16, "anatomy_tokens": (S, A, N) + text fields} -> eq. (5)."""

    def __init__(self, cfg: CAGCLConfig, assets: dict):
        super().__init__(cfg, assets)
        self.cfg = cfg
        self.anatomies = list(cfg.anatomies)
        self.vit = ViT3D(tuple(cfg.input_size), tuple(cfg.patch), cfg.width, cfg.depth, cfg.heads)
        self.pool = AnatomyQueryPooling(len(cfg.anatomies), cfg.width, cfg.pool_heads, cfg.embed_dim)
        self.global_loss = CrossAnatomyGlobalLoss()
        self.generator = torch.Generator(device="cpu")
        self.calls = 0

    def embed_anatomies(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["scan"].unsqueeze(1).to(next(self.parameters()).dtype)
        return self.pool(self.vit(x), batch["anatomy_tokens"].bool())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.gathered(self.embed_anatomies(batch), self.embed_reports(batch), batch)
        scale = self.temperature()
        local = self.local_losses(g, scale).sum()
        out = {"loss_local": local.detach(), "temperature": 1 / scale.detach(), "views": torch.tensor(float(len(batch["scan"])))}
        loss = local
        if self.cfg.global_weight:
            # Same permutations on every worker: they all hold the same gathered batch.
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + self.calls)
            glo = self.global_loss(g["v"], g["r"], g["present"].bool(), scale, self.generator)
            loss = local + self.cfg.global_weight * glo
            out["loss_global"] = glo.detach()
        self.calls += 1
        return {"loss": loss, **out}

    def export_module(self) -> torch.nn.Module:
        return self

    def export_config(self) -> dict:
        c = self.cfg
        return {
            "architecture": "ctray.objectives.cagcl.CAGCLTask (ViT3D + anatomy query pooling, BERT text tower)",
            "anatomies": list(c.anatomies), "input_size": list(c.input_size), "patch": list(c.patch),
            "vit": {"width": c.width, "depth": c.depth, "heads": c.heads}, "embed_dim": c.embed_dim,
            "window_hu": list(c.window_hu), "text": c.text.model_dump(mode="json"),
        }
