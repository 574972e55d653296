"""Trained weights in the formats ctray writes: the name of an export's metadata file, and a
transformers save_pretrained folder loaded strictly into a module (TotalFM stage 2 starts from
stage 1's; ctray.export loads every transformers part)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ctray.errors import ConfigError

META = "export.json"
"""An export folder's metadata (ctray.export): the objective, its config, each part's class and kwargs."""


def load_pretrained_into(module: nn.Module, folder: str, kwargs: dict[str, Any]) -> None:
    """A save_pretrained folder's weights into `module`, strictly. Through from_pretrained, not the
    safetensors file: transformers renames some keys on saving (VideoMAE's q_bias) and back on loading."""
    loaded, info = type(module).from_pretrained(folder, **kwargs, output_loading_info=True)
    wrong = [k for key in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(key, ())]
    if wrong:
        raise ConfigError(f"{folder}: weights do not fit {type(module).__name__} ({len(wrong)} keys, e.g. {wrong[0]})")
    module.load_state_dict(loaded.state_dict(), strict=True)
