"""The vision-text contrast settings TotalFM stage 2 and CA-GCL share (their configs extend
`ContrastConfig`), torch-free like every recipe config."""

from __future__ import annotations

from pydantic import Field

from ctray.data.samplers import AnatomyTexts
from ctray.data.text import TextEncoding
from ctray.evaluate.config import ZeroShotConfig
from ctray.models.config import TextConfig
from ctray.objectives.config import Assets, RecipeConfig

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
    temperature_range: tuple[float, float] = (0.01, 0.5)
    """Clamp of the learnable temperature. Default: CLIP's cap on the logit scale (1/tau <= 100),
    which keeps bf16 logits of cosines coarse-grained enough to rank; fVLM's code allows 0.001
    (scale 1000), and jobs/cagcl.yaml keeps that to follow it."""
    soft_targets: bool = False
    """fVLM's false-negative calibration: identical texts and both-normal anatomies are not
    negatives of each other (soft targets)."""
    text: TextConfig = Field(default_factory=TextConfig)
    zero_shot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)


def text_encoding(cfg: ContrastConfig, assets: Assets) -> TextEncoding:
    """The run's tokenizer (Assets.tokenizer_json, from `prepare`) at the configured text length."""
    if assets.tokenizer_json is None:
        raise ValueError("the assets hold no tokenizer: the objective's prepare() did not run")
    return TextEncoding(assets.tokenizer_json, cfg.text.max_length)


def anatomy_texts(cfg: ContrastConfig, anatomies: list[str], assets: Assets, policy: str) -> AnatomyTexts:
    """The sampler's text side for `anatomies`, with the run's tokenizer."""
    return AnatomyTexts(anatomies, cfg.zero_shot.findings, text_encoding(cfg, assets), policy)
