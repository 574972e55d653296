"""CA-GCL on the device: a 3D ViT over the whole scan (ctray.objectives.cagcl.vit), one learnable query per
anatomy attending to its tokens (shared attention, per-anatomy projection), the anatomy text tower
(ctray.objectives.anatomy_text), and eq. (5): the local loss (eq. 1) summed over anatomies plus
lambda x the cross-anatomy global loss (eq. 2-4, ctray.objectives.losses)."""

from __future__ import annotations

from typing import Any

import torch

from ctray.anatomy import CLASS_IDS, DEFAULT_ANATOMIES
from ctray.objectives.anatomy_text import AnatomyTextTask, synthetic_text_fields
from ctray.objectives.cagcl.config import CAGCLConfig
from ctray.objectives.cagcl.vit import AnatomyQueryPooling, ViT3D
from ctray.objectives.cagcl.vit_init import init_vit3d
from ctray.objectives.ctfm.augment import window
from ctray.objectives.losses import CrossAnatomyGlobalLoss
from ctray.objectives.spec import Assets, Batch, ExportPart


def synthetic_batch(cfg: CAGCLConfig, scans: int, device: torch.device) -> Batch:
    """Random HU scans, and label maps in which each anatomy (or none) holds a random 1/(A+1) of the
    token grid, none on the input's faces (so every anatomy is complete), with random text fields:
    the sampler's keys."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    grid = [s // p for s, p in zip(cfg.input_size, cfg.patch, strict=False)]
    ids = torch.tensor([0] + [synthetic_label_id(cfg, a) for a in cfg.anatomies], dtype=torch.uint8)
    labels = ids[torch.randint(0, len(ids), (scans, *grid), generator=gen)]
    for axis, p in enumerate(cfg.patch):
        labels = labels.repeat_interleave(p, dim=axis + 1)
    labels[:, [0, -1]] = 0
    labels[:, :, [0, -1]] = 0
    labels[:, :, :, [0, -1]] = 0
    batch = {
        "scan": torch.randint(-1024, 2048, (scans, *cfg.input_size), generator=gen, dtype=torch.int16),
        "labels": labels,
        "anatomy_cut": torch.zeros((scans, len(cfg.anatomies)), dtype=torch.uint8),
        **synthetic_text_fields(cfg, scans, len(cfg.anatomies), gen),
    }
    batch["has_text"] = batch.pop("present")
    del batch["region"]
    return {k: v.to(device) for k, v in batch.items()}


def synthetic_label_id(cfg: CAGCLConfig, anatomy: str) -> int:
    """One label id of `anatomy`: the config's, else its default TotalSegmentator group's."""
    ids = cfg.anatomy_labels.get(anatomy) or [CLASS_IDS[c] for c in DEFAULT_ANATOMIES[anatomy]]
    return int(ids[0])


def anatomy_lut(anatomy_ids: dict[str, list[int]], anatomies: list[str]) -> torch.Tensor:
    """(256, A) uint8: 1 where label id i belongs to anatomy j (a label may serve several)."""
    lut = torch.zeros((256, len(anatomies)), dtype=torch.uint8)
    for j, a in enumerate(anatomies):
        lut[list(anatomy_ids[a]), j] = 1
    return lut


def anatomy_masks(
    labels: torch.Tensor,
    lut: torch.Tensor,
    patch: tuple[int, int, int],
    min_voxels: int,
    cut: torch.Tensor,
    evaluation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which anatomies count and the tokens their queries attend to, on the device.

    labels (S, D, H, W) uint8 label ids of the crop; lut (256, A) (`anatomy_lut`); cut (S, A) the
    stored box touches the scan's border (presence "in_scan"). -> tokens (S, A, N) bool, each
    counting anatomy's voxels max-pooled to the ViT's patch grid (N tokens, z-major); region (S, A)
    bool. An anatomy counts with at least `min_voxels` voxels in the crop and, in training (the
    paper's complete anatomical structures N_j, fVLM's "remove incomplete organs caused by random
    crop"), none on the crop's faces and not `cut`. Fixed shapes and no host sync: one gather of
    the lut (S x voxels x A bytes) and max/sum reductions.
    """
    s, d, h, w = labels.shape
    pz, py, px = patch
    hit = lut[labels.int()]  # (S, D, H, W, A)
    voxels = hit.flatten(1, 3).sum(1)
    tokens = hit.view(s, d // pz, pz, h // py, py, w // px, px, -1).amax(dim=(2, 4, 6))
    region = voxels >= min_voxels
    if not evaluation:
        faces = [hit[:, k] for k in (0, -1)] + [hit[:, :, k] for k in (0, -1)] + [hit[:, :, :, k] for k in (0, -1)]
        on_face = torch.stack([f.flatten(1, 2).amax(1) for f in faces]).amax(0)
        region &= (on_face == 0) & (cut == 0)
    return tokens.flatten(1, 3).transpose(1, 2).bool() & region.unsqueeze(-1), region


def vit3d(cfg: CAGCLConfig) -> ViT3D:
    """The config's 3D ViT, randomly initialised."""
    return ViT3D(
        cfg.input_size, cfg.patch, cfg.width, cfg.depth, cfg.heads, dropout=cfg.vit_dropout, out_blocks=cfg.pool_blocks
    )


def device_batch(batch: Batch, cfg: CAGCLConfig, lut: torch.Tensor, evaluation: bool) -> Batch:
    """The sampler's batch -> the windowed scan (float32 in [0, 1]), "anatomy_tokens", "region"
    (the anatomies that count: `anatomy_masks`) and "present" (region and a text: the pairs)."""
    tokens, region = anatomy_masks(batch["labels"], lut, cfg.patch, cfg.min_voxels, batch["anatomy_cut"], evaluation)
    return {
        **batch,
        "scan": window(batch["scan"], *cfg.window_hu),
        "anatomy_tokens": tokens,
        "region": region.to(torch.uint8),
        "present": (region & batch["has_text"].bool()).to(torch.uint8),
    }


class CAGCLTask(AnatomyTextTask):
    """Batch (AnatomyScanSampler) {"scan": (S, D, H, W) int16 HU, "labels": (S, D, H, W) uint8,
    "anatomy_cut": (S, A), "has_text": (S, A) + text fields} -> eq. (5)."""

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
        if assets.anatomy_labels is None:
            raise ValueError("the assets hold no anatomy label ids: the objective's prepare() did not run")
        self.register_buffer("lut", anatomy_lut(assets.anatomy_labels, self.anatomies), persistent=False)
        self.generator = torch.Generator(device="cpu")

    def begin_step(self, step: int, seed: int) -> None:
        # The global loss's permutations: the same on every worker (they all hold the same
        # gathered batch), new at every micro-step, and where they were after a resume.
        self.generator.manual_seed(seed)

    def on_device(self, batch: Batch, evaluation: bool) -> Batch:
        return device_batch(batch, self.cfg, self.lut, evaluation)

    def embed_anatomies(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["scan"].unsqueeze(1).to(self.compute_dtype())
        return self.pool(self.vit.features(x), batch["anatomy_tokens"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = self.on_device(batch, evaluation=False)
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
