"""The report encoder: a BERT-style model (a hub model in real runs, e.g. CXR-BERT as in fVLM; here
random init from the config) whose [CLS] token (or token mean) is projected and L2-normalised. Its
tokenizer is prepared once per run on the driver (ctray.data.text.prepare_tokenizer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctray.models.config import TextConfig


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
