"""The report encoder: a BERT-style model (a hub model in real runs, e.g. CXR-BERT as in fVLM; here
random init from the config) whose [CLS] token (or token mean) is projected and L2-normalised. Its
tokenizer is prepared once per run on the driver (ctray.data.text.prepare_tokenizer)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ctray.config import Section


class TextConfig(Section):
    """BERT-style text encoder and its tokenizer."""

    model: str | None = None
    """A transformers model name or path (e.g. microsoft/BiomedVLP-CXR-BERT-specialized); None:
    a randomly initialised BERT built from the fields below."""
    tokenizer: str | None = None
    """tokenizer.json (folder or s3:// URI). None: the hub model's tokenizer, or (random init) a
    WordPiece tokenizer trained on the shards' report sentences; either is saved as
    <run>/tokenizer.json and reused when the run resumes."""
    vocab_size: int = 8192
    """Vocabulary of the trained tokenizer and the random-init embedding table."""
    hidden_size: int = 768
    """Random init: BERT width."""
    layers: int = 12
    """Random init: transformer layers."""
    heads: int = 12
    """Random init: attention heads."""
    max_length: int = 64
    """Tokens per text ([CLS] ... [SEP], truncated and padded)."""
    tokenizer_min_reports: int = 5
    """A trained tokenizer learns only words seen in at least this many reports (scans), so that
    names in a few reports never become vocabulary; tiny local data sets may lower it."""
    pooling: Literal["cls", "mean"] = "cls"
    """cls: the [CLS] token (fVLM, CA-GCL). mean: the mean over the text's tokens, for random-init
    towers on small data (the local jobs and tests): at init a BERT's [CLS] output hardly depends
    on the other tokens (cosine ~1.0 between any two texts), and it takes long to learn otherwise."""


class TextEncoder(nn.Module):
    """(N, L) token ids + attention mask -> (N, out_dim) L2-normalised [CLS] projections."""

    def __init__(self, cfg: TextConfig, out_dim: int):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if cfg.model:
            self.bert = AutoModel.from_pretrained(cfg.model)
        else:
            self.bert = BertModel(
                BertConfig(
                    vocab_size=cfg.vocab_size,
                    hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads,
                    intermediate_size=4 * cfg.hidden_size,
                    max_position_embeddings=max(512, cfg.max_length),
                ),
                add_pooling_layer=False,
            )
        self.proj = nn.Linear(self.bert.config.hidden_size, out_dim)
        self.pooling = cfg.pooling

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids.long(), attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            w = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        return F.normalize(self.proj(pooled).float(), dim=-1)
