"""A plain 3D ViT on scaled_dot_product_attention, and fVLM/CA-GCL's anatomy query pooling.

Written out rather than taken from MONAI: MONAI's ViT builds attention by hand (einsum + softmax),
which measured 89 views/s against 187 for this shape with SDPA on an H100 at 112x256x352,
and it has no per-anatomy query pooling. fVLM's ViT (lavis/models/blip_models/vit.py, MONAI's
with the intermediate outputs added) is followed where it matters for training: dropout at its
places and the tokens of several blocks handed to the pooling. Starting from a 2D ImageNet ViT is
vit_init.py's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x)).

    `dropout` where fVLM's MONAI block has it (selfattention.py: the attention weights and the
    output projection; MONAI's MLPBlock in its "vit" mode: after the GELU and after the second
    Linear), active in training only.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # Kept a Sequential of (Linear, GELU, Linear), dropout applied in forward: its state-dict
        # keys (mlp.0, mlp.2) are those of exports written before dropout existed.
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # flash / memory-efficient kernels where available
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        h = self.drop(self.mlp[1](self.mlp[0](self.norm2(x))))
        return x + self.drop(self.mlp[2](h))


class ViT3D(nn.Module):
    """(B, 1, D, H, W) -> tokens (B, N, dim), N = prod(input_size / patch), in (z, y, x) raster order.

    fVLM's setting: input 112x256x352, patch 16x16x32 (7x16x11 = 1232 tokens), ViT-B (768, 12, 12),
    dropout 0.1, and the anatomy pooling reading blocks 4, 7, 10 and 12 (`features`).

    `dropout`: after adding the position embedding (fVLM's PatchEmbeddingBlock) and inside every
    block (`Block`); 0 is the model exports before it were. `out_blocks`: the blocks, counted
    from 1, whose tokens `features` returns; it must end with the last block, which is taken after
    the final norm (what `forward` returns), the others as they leave their block (fVLM's
    vit.py: no norm of their own). None: the last block only.
    """

    def __init__(
        self,
        input_size: Sequence[int],
        patch: Sequence[int],
        dim: int,
        depth: int,
        heads: int,
        dropout: float = 0.0,
        out_blocks: Sequence[int] | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not a multiple of its {heads} heads")
        blocks = [int(b) for b in out_blocks] if out_blocks else [depth]
        if blocks != sorted(set(blocks)) or blocks[0] < 1 or blocks[-1] != depth:
            raise ValueError(f"out_blocks {blocks}: increasing block numbers 1..{depth}, ending with {depth}")
        self.out_blocks = tuple(blocks)
        self.patch = (int(patch[0]), int(patch[1]), int(patch[2]))
        self.heads = heads
        self.grid = tuple(s // p for s, p in zip(input_size, patch, strict=False))
        self.patch_embed = nn.Conv3d(1, dim, kernel_size=self.patch, stride=self.patch)
        self.pos = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def no_weight_decay(self) -> set[str]:
        """Position embeddings are not decayed (timm's and open_clip's convention)."""
        return {"pos"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output: the last block's tokens after the final norm, (B, N, dim)."""
        return self._run(x)[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of `out_blocks`, (B, len(out_blocks), N, dim): what the anatomy pooling reads."""
        return torch.stack(self._run(x), dim=1)

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pos_drop(self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos)
        outs = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.out_blocks[:-1]:
                outs.append(x)
        return [*outs, self.norm(x)]


class AnatomyQueryPooling(nn.Module):
    """fVLM / CA-GCL anatomy pooling: V_j = Linear_j(CrossAttn(Q_j, f_j, f_j)), L2-normalised.

    One learnable query per anatomy attends, through one shared multi-head attention, only to the
    tokens its mask selects (the mask max-pooled to the token grid). All anatomies run in one
    attention call with a per-query mask; an anatomy without tokens attends to all tokens (its
    output is then ignored through `present`), which avoids NaNs from an empty softmax.

    Several blocks' tokens (`ViT3D.features`) are pooled as fVLM's blip_pretrain.py
    (get_roi_features) does: the anatomy's tokens of every block concatenated into one key/value
    sequence, one softmax over all of them (no per-block weight or norm). `dropout` is that of the
    attention weights (fVLM: nn.MultiheadAttention(..., dropout=0.1)), in training only.

    tokens (B, N, dim) or (B, L, N, dim) for L blocks, token_mask (B, A, N) bool -> (B, A, out_dim).
    """

    def __init__(self, anatomies: int, dim: int, heads: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(anatomies, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.proj_weight = nn.Parameter(torch.randn(anatomies, dim, out_dim) / math.sqrt(dim))
        self.proj_bias = nn.Parameter(torch.zeros(anatomies, out_dim))
        self.heads = heads

    def no_weight_decay(self) -> set[str]:
        """The anatomy queries are learned tokens, like a [CLS] token, and `proj_bias` is each
        anatomy's projection bias (2-D only because it is per anatomy): not decayed."""
        return {"queries", "proj_bias"}

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        if tokens.ndim == 4:  # (B, L, N, dim): block l's token n at l * N + n, its mask repeated per block
            token_mask = token_mask.repeat(1, 1, tokens.shape[1])
            tokens = tokens.flatten(1, 2)
        allowed = token_mask | ~token_mask.any(-1, keepdim=True)
        blocked = (~allowed).repeat_interleave(self.heads, dim=0)  # (B * heads, A, N), True = masked out
        q = self.queries.unsqueeze(0).expand(b, -1, -1).to(tokens.dtype)
        pooled, _ = self.attn(q, tokens, tokens, attn_mask=blocked, need_weights=False)  # (B, A, dim)
        out = torch.einsum("bad,ado->bao", pooled, self.proj_weight.to(pooled.dtype)) + self.proj_bias.to(pooled.dtype)
        return F.normalize(out.float(), dim=-1)
