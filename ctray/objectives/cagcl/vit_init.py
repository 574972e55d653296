"""CA-GCL's 3D ViT started from a 2D ImageNet ViT (objective.vit_init), as fVLM starts its own.

fVLM (blip_pretrain.py, BlipPretrain.from_config) loads MAE's ImageNet ViT-B,
`mae_pretrain_vit_base.pth`, into its 3D ViT: all 12 blocks and the final norm as they are, the
position embedding with the class token's entry dropped, its 14 x 14 grid resized bilinearly to
the in-plane token grid (16 x 11) and repeated over the 7 slices; the patch embedding and the class
token are not loaded (the 3D patch embedding is trained from scratch). This module does the same
for any plain ViT whose shapes fit, read from:

- a transformers `ViTMAEModel` / `ViTModel` save_pretrained folder or Hub id (through
  from_pretrained, which also renames the keys of checkpoints written by older transformers);
- a timm-named state dict (`blocks.0.attn.qkv.weight`, ...): a .safetensors / .pth / .bin file,
  a folder holding model.safetensors or pytorch_model.bin, or a Hub id of such a repository
  (timm/vit_base_patch16_224.mae holds MAE's `mae_pretrain_vit_base.pth`, fVLM's file; the
  transformers facebook/vit-mae-base is HF's conversion of MAE's *visualisation* checkpoint,
  trained without the normalised-pixel loss, i.e. other weights).

Both are brought to timm's names first, then mapped onto ViT3D with every shape checked; the first
one that does not fit stops the load in one line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from ctray.errors import ConfigError

if TYPE_CHECKING:
    from ctray.objectives.cagcl.vit import ViT3D

log = logging.getLogger(__name__)

PatchEmbedInit = Literal["scratch", "inflate"]

HF_VIT_TYPES = ("vit", "vit_mae")
"""transformers model types whose weights are a plain ViT (ViTModel, ViTMAEModel)."""

# timm's name of a block's parameter -> ViT3D's (ctray.objectives.cagcl.vit.Block).
BLOCK_NAMES = {
    "norm1": "norm1",
    "attn.qkv": "qkv",
    "attn.proj": "proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.2",
}

# transformers' per-layer module names (5.x, then 4.x) -> timm's; q, k and v are concatenated.
_HF_LAYER = re.compile(r"(?:vit\.)?(?:layers|encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)")
_HF_PARTS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "output.dense": "mlp.fc2",
}
_HF_QKV = {
    "attention.q_proj": 0,
    "attention.attention.query": 0,
    "attention.k_proj": 1,
    "attention.attention.key": 1,
    "attention.v_proj": 2,
    "attention.attention.value": 2,
}
_HF_TOP = {
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def init_vit3d(vit: ViT3D, source: str, patch_embed: PatchEmbedInit = "scratch") -> list[str]:
    """`source`'s weights into `vit` (see the module docstring); returns the names of vit's
    parameters it set. Raises ConfigError in one line where `source` cannot be read or a shape
    does not fit."""
    state = vit3d_state(vit, source, patch_embed)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert not unexpected, unexpected  # vit3d_state names only vit's own parameters
    log.info("cagcl: ViT started from %s (%d tensors; from scratch: %s)", source, len(state), ", ".join(missing))
    return sorted(state)


def vit3d_state(vit: ViT3D, source: str, patch_embed: PatchEmbedInit = "scratch") -> dict[str, torch.Tensor]:
    """`source`'s weights under vit's names and in vit's shapes, checked. Only shapes are read from
    `vit`, so a ViT3D on the meta device checks a checkpoint without allocating the model."""
    where = f"objective.vit_init {source}"
    timm, heads = read_2d(source)
    if heads is not None and heads != vit.heads:
        raise ConfigError(f"{where}: {heads} attention heads, the ViT {vit.heads} (objective.heads must match)")
    ours = {k: v.shape for k, v in vit.state_dict().items()}
    depth = len(vit.blocks)
    theirs = 1 + max((int(m.group(1)) for k in timm if (m := _TIMM_BLOCK.fullmatch(k))), default=-1)
    if theirs != depth:
        raise ConfigError(f"{where}: {theirs} blocks, the ViT {depth} (objective.depth must match)")

    def take(name: str) -> torch.Tensor:
        if name not in timm:
            raise ConfigError(f"{where}: no {name} (not a plain ViT with qkv biases)")
        return timm[name]

    pairs: list[tuple[str, str, torch.Tensor]] = []  # (vit's name, the checkpoint's, tensor)
    if patch_embed == "inflate":
        w = take("patch_embed.proj.weight")
        pairs.append(("patch_embed.weight", "patch_embed.proj.weight", inflate_patch_embed(w, vit.patch)))
        pairs.append(("patch_embed.bias", "patch_embed.proj.bias", take("patch_embed.proj.bias")))
    pos = take("pos_embed")
    if pos.shape[-1] != ours["pos"][-1]:  # before resizing: name the width, not a token count
        raise ConfigError(
            f"{where}: pos_embed {tuple(pos.shape)} has width {pos.shape[-1]}, the ViT {ours['pos'][-1]} "
            "(objective.width must match)"
        )
    pairs.append(("pos", "pos_embed", interpolate_pos_embed(pos, vit.grid, where)))
    for i in range(depth):
        for t, o in BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                pairs.append((f"blocks.{i}.{o}.{kind}", f"blocks.{i}.{t}.{kind}", take(f"blocks.{i}.{t}.{kind}")))
    pairs += [("norm.weight", "norm.weight", take("norm.weight")), ("norm.bias", "norm.bias", take("norm.bias"))]

    out = {}
    for mine, name, tensor in pairs:
        if tuple(tensor.shape) != tuple(ours[mine]):
            raise ConfigError(
                f"{where}: {name} {tuple(tensor.shape)} does not fit the ViT's {mine} {tuple(ours[mine])} "
                "(objective.width, depth and heads must match the checkpoint)"
            )
        out[mine] = tensor.detach().float().contiguous()
    return out


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, ...], where: str = "objective.vit_init") -> torch.Tensor:
    """A 2D ViT's position embedding (1, [1 +] g*g, dim) -> ViT3D's (1, gz*gy*gx, dim) in its
    (z, y, x) raster order, as fVLM (blip_pretrain.py): the class token's entry dropped, the g x g
    grid (rows, columns) resized bilinearly (align_corners=False) to the in-plane token grid
    (gy, gx) -- an axial slice's rows and columns, as the image's -- and repeated over the gz
    slices. No depth term is added: every slice starts from the same in-plane code and the
    learned embedding takes depth up in training (fVLM's choice; a trilinear inflation would have
    nothing along depth to interpolate either). A grid equal to (gy, gx) is copied unchanged."""
    dim = pos.shape[-1]
    flat = pos.reshape(-1, dim)
    n = flat.shape[0]
    if math.isqrt(n) ** 2 != n:  # a class token's entry first (MAE, transformers)
        if math.isqrt(n - 1) ** 2 != n - 1:
            raise ConfigError(f"{where}: pos_embed of {n} tokens is no square grid, with or without a class token")
        flat = flat[1:]
    g = math.isqrt(flat.shape[0])
    gz, gy, gx = grid
    plane = flat.float().reshape(1, g, g, dim).permute(0, 3, 1, 2)  # (1, dim, rows, cols)
    if (gy, gx) != (g, g):
        plane = F.interpolate(plane, size=(gy, gx), mode="bilinear", align_corners=False)
    return plane.unsqueeze(2).expand(1, dim, gz, gy, gx).flatten(2).transpose(1, 2).contiguous()


def inflate_patch_embed(weight: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """A 2D patch embedding's kernel (dim, C, ph, pw) -> ViT3D's (dim, 1, pz, py, px), I3D-style
    (Carreira & Zisserman 2017): summed over the C input channels (a grey slice is an image with
    R = G = B), resized to the in-plane patch (py, px) with its sum kept (bilinear, x ph*pw/(py*px)),
    and spread evenly over the pz slices (repeated, / pz), so that a volume constant along z gives
    the 2D kernel's response to its slice. fVLM does not load the patch embedding at all (the 2D
    kernel expects ImageNet-normalised RGB, not windowed HU): `vit_init_patch_embed: scratch`."""
    pz, py, px = patch
    w = weight.float().sum(dim=1, keepdim=True)  # (dim, 1, ph, pw)
    ph, pw = w.shape[-2:]
    if (ph, pw) != (py, px):
        w = F.interpolate(w, size=(py, px), mode="bilinear", align_corners=False) * (ph * pw / (py * px))
    return (w.unsqueeze(2) / pz).expand(-1, -1, pz, -1, -1).contiguous()


def read_2d(source: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """`source` -> its weights under timm's names, and its attention heads where the checkpoint
    records them (a transformers config; a timm state dict does not)."""
    if os.path.isfile(source):
        return _timm_file(source), None
    if os.path.isdir(source):
        config = _json(os.path.join(source, "config.json"))
        if "model_type" in config:
            return _transformers(source, config)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(source, name)):
                return _timm_file(os.path.join(source, name)), None
        raise ConfigError(f"objective.vit_init {source}: a folder with neither a transformers config.json nor weights")
    if HUB_ID.fullmatch(source):
        return _from_hub(source)
    raise ConfigError(f"objective.vit_init {source}: no such file or folder, and not a Hub id (org/name)")


def _json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _transformers(source: str, config: dict) -> tuple[dict[str, torch.Tensor], int | None]:
    """A transformers ViT / ViT-MAE (a folder or a Hub id), its state dict renamed to timm's."""
    from transformers import AutoModel

    where = f"objective.vit_init {source}"
    if config.get("model_type") not in HF_VIT_TYPES:
        kind = config.get("model_type")
        raise ConfigError(f"{where}: a transformers {kind!r} model, not a ViT ({', '.join(HF_VIT_TYPES)})")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{where}: hidden_act {config['hidden_act']!r}; the ViT's MLP uses exact GELU")
    try:
        model = AutoModel.from_pretrained(source)
    except Exception as e:  # unreadable weights, offline: one line naming the source
        raise ConfigError(f"{where}: from_pretrained failed ({type(e).__name__})") from None
    return hf_to_timm(model.state_dict(), where), int(model.config.num_attention_heads)


def hf_to_timm(state: dict[str, torch.Tensor], where: str = "objective.vit_init") -> dict[str, torch.Tensor]:
    """A transformers ViT state dict (5.x's names or 4.x's) under timm's names. The class and mask
    tokens and the pooler have no place in ViT3D and are left out; any other unknown name of a
    layer stops the load (a block ViT3D would not compute the same)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if m := _HF_LAYER.fullmatch(key):
            i, module, kind = int(m.group(1)), m.group(2), m.group(3)
            if module in _HF_QKV:
                qkv.setdefault((i, kind), {})[_HF_QKV[module]] = value
            elif module in _HF_PARTS:
                out[f"blocks.{i}.{_HF_PARTS[module]}.{kind}"] = value
            else:
                raise ConfigError(f"{where}: {key} has no counterpart in the 3D ViT (not a plain ViT block)")
        elif key in _HF_TOP:
            out[_HF_TOP[key]] = value
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:
            raise ConfigError(f"{where}: layer {i} lacks some of its query/key/value {kind}s")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)  # timm's q, k, v order
    return out


def _timm_file(path: str) -> dict[str, torch.Tensor]:
    """A timm-named state dict from a file; MAE's and many trainers' {"model": ...} or
    {"state_dict": ...} wrapping and DDP's "module." prefix undone. Tensors only (no pickled code:
    torch.load with weights_only)."""
    where = f"objective.vit_init {path}"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = f"{type(e).__name__}; a .pth must hold tensors only"
        raise ConfigError(f"{where}: not readable as a state dict ({why})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _from_hub(repo_id: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """A Hub repository: a transformers ViT where its config.json says so, else timm's weights file."""
    where = f"objective.vit_init {repo_id}"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ConfigError(f"{where}: not a local path; loading from the Hub needs huggingface_hub") from None
    try:
        config = _json(hf_hub_download(repo_id, "config.json"))
    except Exception as e:  # offline, unknown repository, no access: one line naming the id
        raise ConfigError(f"{where}: not a local path, and the Hub did not give it ({type(e).__name__})") from None
    if "model_type" in config:
        return _transformers(repo_id, config)
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = hf_hub_download(repo_id, name)
        except Exception:  # absent: the next name, then one error naming both
            continue
        return _timm_file(path), None
    raise ConfigError(f"{where}: the Hub repository holds neither model.safetensors nor pytorch_model.bin")
