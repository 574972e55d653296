"""TotalFM stage 2 on the driver and the device: the stage-1 hand-off (checked before any worker
starts) and the organ-wise CLIP task, the stage-1 encoder mean-pooled and projected against one
finding sentence of the organ per step."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ctray.config import StorageConfig
from ctray.errors import ConfigError
from ctray.models.pretrained import META, load_pretrained_into
from ctray.objectives.anatomy_text import AnatomyTextTask, synthetic_text_fields, text_assets
from ctray.objectives.slots import encode_at, slots_of
from ctray.objectives.spec import Assets, Batch, ExportPart, layer_norm_part, linear_part
from ctray.objectives.totalfm.config import TotalFMCLIPConfig, export_config
from ctray.objectives.totalfm.mae import position_tables_as_buffers, synthetic_batch

if TYPE_CHECKING:
    from ctray.run_folder import RunFolder

log = logging.getLogger(__name__)


def stage1_export(init_from: str) -> str:
    """A stage-1 run folder or its export/ folder -> the export folder's URI."""
    init_from = init_from.rstrip("/")
    return init_from if init_from.endswith("/export") or init_from == "export" else init_from + "/export"


def check_stage1(cfg: TotalFMCLIPConfig, storage: StorageConfig) -> str | None:
    """Driver-side check of the hand-off: the stage-1 export exists and was cut and built like this
    stage's organs and model. Returns the URI of its VideoMAE folder (None: random init,
    with a loud warning)."""
    from ctray.storage import filesystem, read_bytes, resolve_uri

    if cfg.init_from is None:
        log.warning(
            "=" * 70 + "\ntotalfm_clip: objective.init_from is not set, so the vision encoder starts from RANDOM "
            "INIT instead of the stage-1 VideoMAE encoder. Set it to the totalfm_mae run folder.\n" + "=" * 70
        )
        return None
    uri = resolve_uri(stage1_export(cfg.init_from))
    fs, path = filesystem(uri, storage)
    try:
        meta = json.loads(read_bytes(fs, f"{path}/{META}", storage))
    except FileNotFoundError:
        raise ConfigError(
            f"objective.init_from: no stage-1 export at {uri} (run totalfm_mae to the end first)"
        ) from None
    if "folder" not in meta.get("parts", {}).get("vision", {}):
        raise ConfigError(f"objective.init_from: {uri} is a {meta.get('objective')} export, not a VideoMAE stage 1")
    ours = json.loads(json.dumps(export_config(cfg.model, cfg.organs)))
    if meta.get("organs") != ours["organs"]:
        raise ConfigError(
            f"objective.init_from: {uri} was trained with different organs than this stage "
            "(objective.organs must match)"
        )
    theirs, mine = _encoder_fields(meta.get("config", {})), _encoder_fields(ours["config"])
    if theirs != mine:
        diff = sorted(k for k in theirs.keys() | mine.keys() if theirs.get(k) != mine.get(k))
        raise ConfigError(
            f"objective.init_from: {uri} has a different encoder than objective.model ({', '.join(diff)})"
        )
    return f"{uri}/{meta['parts']['vision']['folder']}"


def _encoder_fields(config: dict) -> dict:
    """The VideoMAE config fields that shape the encoder's weights (the decoder and versions may differ)."""
    return {k: config.get(k) for k in _ENCODER_FIELDS}


_ENCODER_FIELDS = (
    "image_size",
    "num_frames",
    "num_channels",
    "patch_size",
    "tubelet_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "qv_bias",
    "use_mean_pooling",
)


def clip_assets(cfg: TotalFMCLIPConfig, shards: str, run: RunFolder) -> Assets:
    """The run's tokenizer and the checked stage-1 export."""
    init_from = check_stage1(cfg, run.storage)
    return text_assets(cfg, shards, run).model_copy(update={"init_from": init_from, "storage": run.storage})


def synthetic_clip_batch(cfg: TotalFMCLIPConfig, scans: int, device: torch.device) -> Batch:
    """Stage 1's random organ volumes and random text fields (every organ present)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    text = synthetic_text_fields(cfg, scans, len(cfg.organs.anatomies), gen)
    return {**synthetic_batch(cfg.organs, scans, device), **{k: v.to(device) for k, v in text.items()}}


class TotalFMCLIPTask(AnatomyTextTask):
    """Organ volumes + one sentence per organ -> organ-wise CLIP loss (see module docstring)."""

    def __init__(self, cfg: TotalFMCLIPConfig, assets: Assets):
        super().__init__(cfg, assets)
        from transformers import VideoMAEModel

        self.cfg = cfg
        self.anatomies = list(cfg.organs.anatomies)
        self.vision = position_tables_as_buffers(VideoMAEModel(cfg.model.videomae_config(cfg.organs)))
        if assets.init_from:
            self._load_stage1(assets.init_from, assets.storage or StorageConfig())
        self.vision_norm = nn.LayerNorm(cfg.model.hidden_size)
        self.vision_proj = nn.Linear(cfg.model.hidden_size, cfg.embed_dim)

    def _load_stage1(self, uri: str, storage: StorageConfig) -> None:
        from ctray.storage import local_folder

        with local_folder(uri, storage) as folder:
            load_pretrained_into(self.vision, folder, {})
        log.info("totalfm_clip: vision encoder loaded from stage 1 (%s)", uri)

    def embed_volumes(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, 1, H, W) -> (N, embed_dim) L2-normalised."""
        tokens = self.vision(pixel_values=x).last_hidden_state
        return F.normalize(self.vision_proj(self.vision_norm(tokens.mean(1))).float(), dim=-1)

    def embed_organs(self, organs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(S, A, T, H, W) organ volumes -> (S, A, embed_dim), only the slots numbered in `slots`
        (`slots_of`) encoded (and one more, weighted 0: `encode_at`)."""
        videos = organs.flatten(0, 1).unsqueeze(2)  # (S * A, T, 1, H, W): each organ a 1-channel video
        encode = lambda idx: self.embed_volumes(videos.index_select(0, idx).to(self.compute_dtype()))  # noqa: E731
        return encode_at(slots, organs.shape[:2], encode)

    def embed_anatomies(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.embed_organs(batch["organs"], slots_of(batch["region"].bool()))

    def host_fields(self, batch: Batch) -> Batch:
        """The present organs' slots (`slots_of`) as "present_slots": the number of organ volumes
        and texts the step encodes is then a shape."""
        return {"present_slots": slots_of(batch["present"].bool())}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        present = batch["present"].bool()
        slots = batch["present_slots"] if "present_slots" in batch else slots_of(present)
        g = self.gathered(self.embed_organs(batch["organs"], slots), self.embed_reports(batch, slots), batch)
        scale = self.temperature()
        per_organ = self.local_losses(g, scale)
        organs_with_pairs = (g["present"].bool().sum(0) >= 2).sum().clamp(min=1)
        loss = per_organ.sum() / (2 * organs_with_pairs)
        views = torch.tensor(float(len(slots)))  # a host number: the slots' count is their shape
        return {"loss": loss, "temperature": 1 / scale.detach(), "views": views}

    def export_parts(self) -> dict[str, ExportPart]:
        return {
            "vision": ExportPart(self.vision),
            "vision_norm": layer_norm_part(self.vision_norm),
            "vision_proj": linear_part(self.vision_proj),
            **self.text_parts(),
        }

    def export_config(self) -> dict:
        return {
            **export_config(self.cfg.model, self.cfg.organs),
            **super().export_config(),
            "vision_part": "vision",
            "embedding": "vision_proj(vision_norm(VideoMAEModel tokens mean)) per organ volume, L2-normalised",
        }
