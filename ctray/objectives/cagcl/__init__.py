"""CA-GCL: cross-anatomy global-local contrastive learning with clinical-aware text augmentation
(the CA-GCL paper, Sec. 2.1-2.3; anatomy pooling as in fVLM,
alibaba-damo-academy/fvlm).

Vision: a 3D ViT over the whole scan (fVLM: 112x256x352, patch 16x16x32); per anatomy, its mask
max-pooled to the token grid selects tokens, a learnable query attends to them through one shared
multi-head attention, a per-anatomy Linear projects, L2 normalisation (V_ij). Text: the
anatomy-level report, clinically augmented (random non-empty subset of its sentences, shuffled),
through a BERT-style encoder, [CLS] -> projection (R_ij). Loss (eq. 5): sum over anatomies of the
local loss (eq. 1) + lambda * the global loss over synthetic cross-anatomy groups (eq. 2-4).

Top to bottom: config.py (settings), sampler.py (CPU side: scan resized to the ViT input, each
anatomy's mask max-pooled to the token grid, clinical-aware texts), vit.py (the 3D ViT and the
anatomy pooling), vit_init.py (the ViT started from a 2D ImageNet ViT, as fVLM), task.py (device
side), and recipe.py (the label ids read from the shards' manifest, `vit_init` checked, the
registry entry, the sweep space).

This package's __init__ imports nothing: Ray Data's task processes import the sampler module
alone, without torch.
"""
