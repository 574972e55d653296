"""The vision-text half shared by TotalFM stage 2 and CA-GCL: anatomy texts -> BERT [CLS] ->
projection, a learnable temperature, the anatomy-wise InfoNCE over the batch gathered from every
worker (with autograd), and zero-shot evaluation. A subclass supplies `embed_anatomies`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ctray import dist
from ctray.data.samplers import AnatomyTexts
from ctray.data.text import TextEncoding, prepare_tokenizer
from ctray.export import ExportPart, linear_part
from ctray.models.text import TextConfig, TextEncoder
from ctray.objectives.losses import AnatomyLocalLoss, LearnableTemperature
from ctray.objectives.spec import Batch, Evaluation, RecipeConfig, Task
from ctray.objectives.zeroshot import ZeroShotConfig, evaluate
from ctray.run_folder import RunFolder

BERT_B = (
    "objective.text.hidden_size=768",
    "objective.text.layers=12",
    "objective.text.heads=12",
    "objective.text.max_length=64",
)
"""Overrides of the local jobs that build a BERT-base text tower (bench step on a GPU)."""


class ContrastConfig(RecipeConfig):
    """Vision-text contrast shared by TotalFM stage 2 and CA-GCL (their configs extend it)."""

    embed_dim: int = 256
    """Joint embedding width (fVLM: 256)."""
    temperature_init: float = 0.07
    """Initial temperature (fVLM / CLIP: 0.07); learnable."""
    temperature_range: tuple[float, float] = (0.001, 0.5)
    """Clamp of the learnable temperature (fVLM: 0.001..0.5)."""
    soft_targets: bool = False
    """fVLM's false-negative calibration: identical texts and both-normal anatomies are not
    negatives of each other (soft targets)."""
    text: TextConfig = Field(default_factory=TextConfig)
    zero_shot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)


def synthetic_text_fields(
    cfg: ContrastConfig, scans: int, anatomies: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random text fields of the samplers' shapes and dtypes (every anatomy present), for
    `data.synthetic` and FLOP counting."""
    length = cfg.text.max_length
    return {
        "present": torch.ones((scans, anatomies), dtype=torch.uint8),
        "region": torch.ones((scans, anatomies), dtype=torch.uint8),
        "text_ids": torch.randint(5, cfg.text.vocab_size, (scans, anatomies, length), generator=gen, dtype=torch.int32),
        "text_mask": torch.ones((scans, anatomies, length), dtype=torch.uint8),
        "text_hash": torch.arange(scans * anatomies, dtype=torch.int64).reshape(scans, anatomies),
        "abnormal": torch.full((scans, anatomies), -1, dtype=torch.int8),
        "finding_labels": torch.full((scans, len(cfg.zero_shot.findings)), -1, dtype=torch.int8),
    }


def text_assets(cfg: Any) -> dict[str, Any]:
    """Driver side (PretrainConfig -> assets): the run's tokenizer."""
    run_dir = RunFolder.of(cfg).uri
    return {
        "tokenizer_json": prepare_tokenizer(cfg.objective.text, cfg.data.shards, run_dir, cfg.storage),
    }


def text_encoding(cfg: ContrastConfig, assets: dict[str, Any]) -> TextEncoding:
    return TextEncoding(assets["tokenizer_json"], cfg.text.max_length)


def anatomy_texts(cfg: ContrastConfig, anatomies: list[str], assets: dict[str, Any], policy: str) -> AnatomyTexts:
    """The sampler's text side for `anatomies`, with the run's tokenizer."""
    return AnatomyTexts(anatomies, cfg.zero_shot.findings, text_encoding(cfg, assets), policy)


def at_slots(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Embeddings of the True slots of an (S, A) mask, in mask order -> (S, A, D), zeros elsewhere."""
    out = values.new_zeros((*mask.shape, values.shape[-1]))
    out[mask] = values
    return out


def encode_slots(mask: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(S, A) bool mask -> (S, A, D): `encode(slots)` of the True slots (indices into the flattened
    S x A slots) in place, zeros elsewhere. The first slot is encoded as well and added with weight
    0, so the encoder runs and every one of its parameters gets a gradient whatever the mask holds:
    a rank whose batch has no report text or no organ would otherwise skip the backward of the
    gathers and DeepSpeed's gradient reduction, and the other ranks would wait for it forever."""
    slots = torch.cat([mask.flatten().nonzero().squeeze(1), mask.new_zeros(1, dtype=torch.long)])
    out = encode(slots)
    return at_slots(mask, out[:-1]) + 0.0 * out[-1:].sum()


def anatomy_embeddings(v: torch.Tensor, region: torch.Tensor) -> dict[str, torch.Tensor]:
    """(S, A, D) L2-normalised anatomy embeddings, (S, A) region -> "anatomy_embedding" (zeros
    outside the region) and "embedding" (S, D): the L2-normalised mean over the scan's anatomies."""
    region = region.bool()
    v = v.float() * region.unsqueeze(-1)
    mean = v.sum(1) / region.sum(1, keepdim=True).clamp(min=1)
    return {"anatomy_embedding": v, "embedding": torch.nn.functional.normalize(mean, dim=-1)}


class AnatomyTextTask(Task):
    """Base task. Batch keys (from ctray.data.samplers.AnatomyTexts): text_ids, text_mask (S, A, L);
    present, region (S, A); text_hash (S, A); abnormal (S, A); finding_labels (S, F)."""

    anatomies: list[str]

    def __init__(self, contrast: ContrastConfig, assets: dict[str, Any]):
        super().__init__()
        self.contrast = contrast
        self.text = TextEncoder(contrast.text, contrast.embed_dim)
        self.temperature = LearnableTemperature(contrast.temperature_init, *contrast.temperature_range)
        self.local = AnatomyLocalLoss(contrast.soft_targets)
        self.encoding = text_encoding(contrast, assets)

    def clamped_parameters(self) -> list[tuple[nn.Parameter, float, float]]:
        return [(self.temperature.tau, *self.temperature.bounds)]

    def embed_anatomies(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> (S, A, embed_dim) L2-normalised anatomy image embeddings (rows outside `region` arbitrary)."""
        raise NotImplementedError

    def embed_reports(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(S, A, embed_dim): the text embeddings of the present anatomies (zeros elsewhere); only
        those texts go through the encoder (and one more, weighted 0: `encode_slots`)."""
        ids, mask = batch["text_ids"].flatten(0, 1), batch["text_mask"].flatten(0, 1).clone()
        mask[:, 0] = 1  # [CLS] attended in every text, the absent slot encoded for `encode_slots` too
        return encode_slots(batch["present"].bool(), lambda slots: self.text(ids[slots], mask[slots]))

    def gathered(self, v: torch.Tensor, r: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The global batch: embeddings with autograd, the rest without (open_clip gather_features)."""
        return {
            "v": dist.gather_with_grad(v),
            "r": dist.gather_with_grad(r),
            **{k: dist.gather(batch[k]) for k in ("present", "text_hash", "abnormal")},
        }

    def local_losses(self, g: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        return self.local(g["v"], g["r"], g["present"].bool(), scale, g["text_hash"], g["abnormal"])

    @torch.no_grad()
    def embed(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Anatomy embeddings where the anatomy is in the image (`region`), their scan mean, and the
        embeddings of the report's anatomy texts where it has one (`present`, zeros elsewhere)."""
        out = anatomy_embeddings(self.embed_anatomies(batch), batch["region"])
        return {**out, "text_embedding": self.embed_reports(batch).float()}

    def text_parts(self) -> dict[str, ExportPart]:
        """The text tower: BERT as a transformers folder (with the tokenizer) and its projection."""
        bert = self.text.bert
        no_pooler = {"add_pooling_layer": False} if getattr(bert, "pooler", True) is None else {}
        return {"text": ExportPart(bert, kwargs=no_pooler), "text_proj": linear_part(self.text.proj)}

    def export_config(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature.tau.detach()[0]), "anatomies": list(self.anatomies)}

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        ids, mask = self.encoding.encode(texts)
        return self.text(torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch], step: int) -> Evaluation:
        """Zero-shot metrics and the text-collapse diagnostic over evaluation batches (same keys as
        training batches, from the sampler with a fixed seed)."""
        vs, regions, findings, abnormal, texts, text_anatomy = [], [], [], [], [], []
        for batch in batches:
            vs.append(self.embed_anatomies(batch).float())
            r = self.embed_reports(batch)
            present = batch["present"].bool()
            texts.append(r[present])
            text_anatomy.append(present.nonzero()[:, 1].cpu().numpy())
            regions.append(batch["region"].bool().cpu().numpy())
            findings.append(batch["finding_labels"].cpu().numpy())
            abnormal.append(batch["abnormal"].cpu().numpy())
        return evaluate(
            torch.cat(vs),
            np.concatenate(regions),
            np.concatenate(findings),
            np.concatenate(abnormal),
            torch.cat(texts),
            np.concatenate(text_anatomy),
            self.anatomies,
            lambda t: self.embed_texts(t).float(),
            float(self.temperature()),
            self.contrast.zero_shot,
            step,
        )
