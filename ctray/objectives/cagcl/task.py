"""CA-GCL on the device: a 3D ViT over the whole scan (ctray.objectives.cagcl.vit), one learnable query per
anatomy attending to its tokens (shared attention, per-anatomy projection), the anatomy text tower
(ctray.objectives.anatomy_text), and eq. (5): the local loss (eq. 1) summed over anatomies plus
lambda x the cross-anatomy global loss (eq. 2-4, ctray.objectives.losses)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ctray.objectives.anatomy_text import AnatomyTextTask, synthetic_text_fields
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.objectives.cagcl.vit import AnatomyQueryPooling, ViT3D
from ctray.objectives.cagcl.vit_init import init_vit3d
from ctray.objectives.losses import CrossAnatomyGlobalLoss
from ctray.objectives.spec import Assets, Batch, ExportPart


def synthetic_batch(cfg: CAGCLConfig, scans: int, device: torch.device) -> Batch:
    """Random scans, token masks covering ~20% of the grid per anatomy, and random text fields."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = len(cfg.anatomies)
    tokens = math.prod(s // p for s, p in zip(cfg.input_size, cfg.patch, strict=False))
    batch = {
        "scan": torch.rand((scans, *cfg.input_size), generator=gen).half(),
        "anatomy_tokens": (torch.rand((scans, a, tokens), generator=gen) < 0.2).to(torch.uint8),
        **synthetic_text_fields(cfg, scans, a, gen),
    }
    return {k: v.to(device) for k, v in batch.items()}


def vit3d(cfg: CAGCLConfig) -> ViT3D:
    """The config's 3D ViT, randomly initialised."""
    return ViT3D(
        cfg.input_size, cfg.patch, cfg.width, cfg.depth, cfg.heads, dropout=cfg.vit_dropout, out_blocks=cfg.pool_blocks
    )


class CAGCLTask(AnatomyTextTask):
    """Batch {"scan": (S, D, H, W) float16, "anatomy_tokens": (S, A, N) + text fields} -> eq. (5)."""

    def __init__(self, cfg: CAGCLConfig, assets: Assets):
        super().__init__(cfg, assets)
        self.cfg = cfg
        self.anatomies = list(cfg.anatomies)
        self.vit = vit3d(cfg)
        if cfg.vit_init:
            # On every worker, as the text tower's hub model: the driver has checked it (recipe.py).
            init_vit3d(self.vit, cfg.vit_init, cfg.vit_init_patch_embed)
        self.pool = AnatomyQueryPooling(
            len(cfg.anatomies), cfg.width, cfg.pool_heads, cfg.embed_dim, dropout=cfg.pool_dropout
        )
        self.global_loss = CrossAnatomyGlobalLoss()
        self.generator = torch.Generator(device="cpu")

    def begin_step(self, step: int, seed: int) -> None:
        # The global loss's permutations: the same on every worker (they all hold the same
        # gathered batch), new at every micro-step, and where they were after a resume.
        self.generator.manual_seed(seed)

    def embed_anatomies(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["scan"].unsqueeze(1).to(self.compute_dtype())
        return self.pool(self.vit.features(x), batch["anatomy_tokens"].bool())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.gathered(self.embed_anatomies(batch), self.embed_reports(batch), batch)
        scale = self.temperature()
        local = self.local_losses(g, scale).sum()
        # How often each anatomy formed a pair in the global batch: an anatomy the sampler rarely
        # finds complete is rarely trained (logged as means over each report's window).
        shares = g["present"].float().mean(0).detach()
        out = {
            "loss_local": local.detach(),
            "temperature": 1 / scale.detach(),
            "views": torch.tensor(float(len(batch["scan"]))),
            **{f"anatomy_pairs.{a}": shares[j] for j, a in enumerate(self.anatomies)},
        }
        loss = local
        if self.cfg.global_weight:
            glo = self.global_loss(g["v"], g["r"], g["present"].bool(), scale, self.generator)
            loss = local + self.cfg.global_weight * glo
            out["loss_global"] = glo.detach()
        return {"loss": loss, **out}

    def advice(self, metrics: dict[str, float]) -> dict[str, str]:
        """Subject -> the warning a report's metrics call for: an anatomy that zero-shot findings are
        scored on but that formed a pair in under 10% of the window's scans (its findings get little
        signal: `presence`, `crop_anatomies`, the scans' field of view)."""
        scored = set(self.cfg.zero_shot.findings.values())
        return {
            a: f"anatomy {a} formed a pair in {metrics[key]:.0%} of the scans (findings scored on it get little "
            "signal; see objective.presence and objective.crop_anatomies)"
            for a in self.anatomies
            if a in scored and (key := f"anatomy_pairs.{a}") in metrics and metrics[key] < 0.1
        }

    def export_parts(self) -> dict[str, ExportPart]:
        c = self.cfg
        vit: dict[str, Any] = {"input_size": list(c.input_size), "patch": list(c.patch), "dim": c.width}
        vit |= {"depth": c.depth, "heads": c.heads, "dropout": c.vit_dropout, "out_blocks": list(self.vit.out_blocks)}
        pool: dict[str, Any] = {"anatomies": len(c.anatomies), "dim": c.width, "heads": c.pool_heads}
        pool |= {"out_dim": c.embed_dim, "dropout": c.pool_dropout}
        return {
            "vision": ExportPart(self.vit, "ctray.objectives.cagcl.vit.ViT3D", vit),
            "anatomy_pooling": ExportPart(self.pool, "ctray.objectives.cagcl.vit.AnatomyQueryPooling", pool),
            **self.text_parts(),
        }

    def export_config(self) -> dict:
        c = self.cfg
        return {
            **super().export_config(),
            "vision_part": "vision",
            "embedding": "anatomy_pooling(vision.features(scan), anatomy token masks): (S, A, embed_dim), "
            "L2-normalised (features: the tokens of the ViT's out_blocks)",
            "input": {
                "spacing_zyx_mm": "the shards' (fVLM: 3 x 1 x 1)",
                "window_hu": list(c.window_hu),
                "input_size": list(c.input_size),
                "fit": c.fit,
                "crop_margin": list(c.crop_margin),
            },
        }
