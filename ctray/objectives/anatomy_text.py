"""The vision-text half shared by TotalFM stage 2 and CA-GCL: anatomy texts -> BERT [CLS] ->
projection, a learnable temperature, the anatomy-wise InfoNCE over the batch gathered from every
worker (with autograd), and zero-shot evaluation. A subclass supplies `embed_anatomies`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ctray import dist
from ctray.data.text import prepare_tokenizer
from ctray.evaluate.zeroshot import AnatomyScans, Prompts, evaluate
from ctray.models.text import TextEncoder
from ctray.objectives.contrast import ContrastConfig, text_encoding
from ctray.objectives.losses import AnatomyLocalLoss, LearnableTemperature
from ctray.objectives.slots import anatomy_embeddings, encode_at, slots_of
from ctray.objectives.spec import Assets, Batch, Evaluation, ExportPart, Task, linear_part
from ctray.run_folder import RunFolder


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


def text_assets(cfg: ContrastConfig, shards: str, run: RunFolder) -> Assets:
    """Driver side: the run's tokenizer (trained on the shards' reports, or the configured one),
    saved in the run folder."""
    return Assets(tokenizer_json=prepare_tokenizer(cfg.text, shards, run.uri, run.storage))


class AnatomyTextTask(Task):
    """Base task. Batch keys (from ctray.data.samplers.AnatomyTexts): text_ids, text_mask (S, A, L);
    present, region (S, A); text_hash (S, A); abnormal (S, A); finding_labels (S, F)."""

    anatomies: list[str]

    def __init__(self, contrast: ContrastConfig, assets: Assets):
        super().__init__()
        self.contrast = contrast
        self.text = TextEncoder(contrast.text, contrast.embed_dim)
        self.temperature = LearnableTemperature(contrast.temperature_init, *contrast.temperature_range)
        self.local = AnatomyLocalLoss(contrast.soft_targets)
        self.encoding = text_encoding(contrast, assets)

    def clamped_parameters(self) -> list[tuple[nn.Parameter, float, float]]:
        return [(self.temperature.tau, *self.temperature.bounds)]

    def on_device(self, batch: Batch, evaluation: bool) -> Batch:
        """The sampler's batch, on the device -> the keys the methods below read (present, region,
        ...): the device's share of the sampling (CA-GCL's token masks). `evaluation`: embedding
        and evaluation batches (the embed sampler's), not training ones."""
        return batch

    def embed_anatomies(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """-> (S, A, embed_dim) L2-normalised anatomy image embeddings (rows outside `region` arbitrary)."""
        raise NotImplementedError

    def embed_reports(self, batch: dict[str, torch.Tensor], slots: torch.Tensor | None = None) -> torch.Tensor:
        """(S, A, embed_dim): the text embeddings of the present anatomies (zeros elsewhere); only
        those texts go through the encoder (and one more, weighted 0: `encode_at`). `slots`: the
        present slots (`slots_of`) where the caller has them from the host (Task.host_fields), so
        that their number is not read back from the device."""
        ids, mask = batch["text_ids"].flatten(0, 1), batch["text_mask"].flatten(0, 1).clone()
        mask[:, 0] = 1  # [CLS] attended in every text, the absent slot encoded for `encode_at` too
        present = batch["present"].bool()
        slots = slots_of(present) if slots is None else slots
        return encode_at(slots, present.shape, lambda idx: self.text(ids[idx], mask[idx]))

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
        batch = self.on_device(batch, evaluation=True)
        out = anatomy_embeddings(self.embed_anatomies(batch), batch["region"])
        texts = self.embed_reports(batch).float()
        # region and present as on_device decided them: what `ctray embed` writes beside the embeddings
        return {**out, "text_embedding": texts, "region": batch["region"].bool(), "present": batch["present"].bool()}

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
            batch = self.on_device(batch, evaluation=True)
            vs.append(self.embed_anatomies(batch).float())
            r = self.embed_reports(batch)
            present = batch["present"].bool()
            texts.append(r[present])
            text_anatomy.append(present.nonzero()[:, 1].cpu().numpy())
            regions.append(batch["region"].bool().cpu().numpy())
            findings.append(batch["finding_labels"].cpu().numpy())
            abnormal.append(batch["abnormal"].cpu().numpy())
        zs = self.contrast.zero_shot
        scans = AnatomyScans(
            torch.cat(vs),
            np.concatenate(regions),
            np.concatenate(findings),
            list(zs.findings),
            np.concatenate(abnormal),
            self.anatomies,
        )
        prompts = Prompts(lambda t: self.embed_texts(t).float(), float(self.temperature()))
        return evaluate(scans, torch.cat(texts), np.concatenate(text_anatomy), prompts, zs, step)
