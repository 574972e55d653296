"""Per-anatomy slots of a batch: (S, A) masks over scans x anatomies, and the (S, A, D) embeddings
that fill them. Shared by every anatomy recipe (TotalFM's two stages, CA-GCL)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def at_slots(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Embeddings of the True slots of an (S, A) mask, in mask order -> (S, A, D), zeros elsewhere."""
    out = values.new_zeros((*mask.shape, values.shape[-1]))
    out[mask] = values
    return out


def slots_of(mask: torch.Tensor) -> torch.Tensor:
    """(S, A) mask -> the indices of its True slots in the flattened S x A slots, in mask order.
    On a host batch (Task.host_fields) it costs the step nothing; on the device its length must be
    read back (a device-to-host sync)."""
    return mask.flatten().nonzero().squeeze(1)


def encode_at(
    slots: torch.Tensor, shape: tuple[int, ...], encode: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`slots` (N,) indices into the flattened S x A slots of `shape` (S, A) -> (S, A, D):
    `encode(slots)` in place, zeros elsewhere. The first slot is encoded as well and added with
    weight 0, so the encoder runs and every one of its parameters gets a gradient whatever the batch
    holds: a rank whose batch has no report text or no organ would otherwise skip the backward of the
    gathers and DeepSpeed's gradient reduction, and the other ranks would wait for it forever. No
    size here depends on a device value: with `slots` from the host (Task.host_fields) it needs
    no sync."""
    out = encode(torch.cat([slots, slots.new_zeros(1)]))
    flat = out.new_zeros((shape[0] * shape[1], out.shape[-1])).index_copy(0, slots, out[:-1])
    return flat.view(shape[0], shape[1], -1) + 0.0 * out[-1:].sum()


def anatomy_embeddings(v: torch.Tensor, region: torch.Tensor) -> dict[str, torch.Tensor]:
    """(S, A, D) L2-normalised anatomy embeddings, (S, A) region -> "anatomy_embedding" (zeros
    outside the region) and "embedding" (S, D): the L2-normalised mean over the scan's anatomies."""
    region = region.bool()
    v = v.float() * region.unsqueeze(-1)
    mean = v.sum(1) / region.sum(1, keepdim=True).clamp(min=1)
    return {"anatomy_embedding": v, "embedding": torch.nn.functional.normalize(mean, dim=-1)}
