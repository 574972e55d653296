"""The objective registry: an objective is a spec owning its config, CPU sampler, device task
(augmentation + model + loss) and export. The trainer knows nothing about any one paper.

To add one: a module with a `Section` config whose `name` is a Literal, a `prepare` function
(driver-side assets, or `no_assets`), a sampler class (Ray Data map_batches UDF in
ctray.data.samplers with a `columns` attribute naming the shard columns it reads) and a task
nn.Module whose forward(batch) returns a dict with "loss", "views" and any metrics (and, to be
evaluated during training, an `evaluate(batches, step)` method); then a
`register(ObjectiveSpec(...))` line below and the config in `ObjectiveConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Union

from pydantic import Field
from torch import nn

from ctray.objectives import cagcl, ctfm, totalfm


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    config: type
    prepare: Callable[..., dict]
    """PretrainConfig -> assets (JSON-able), run once on the driver before training: a trained or
    exported tokenizer, label ids from the manifest, a checked stage-1 export. Every rank's task
    and the sampler receive them."""
    sampler: Callable[..., Callable[[dict], dict]]
    """(config, assets, seed=None) -> map_batches UDF (from ctray.data.samplers: numpy only, so Ray Data's task processes
    do not import torch); its attribute `columns` lists the shard columns it reads."""
    task: Callable[..., nn.Module]
    """(config, assets) -> nn.Module with forward(batch) -> {"loss", "views", ...}, export_module(),
    export_config(); optionally evaluate(batches, step) -> ctray.objectives.zeroshot.Evaluation."""
    synthetic_batch: Callable[..., dict]
    """(config, scans, device) -> an in-memory batch like the sampler's, for `data.synthetic`."""
    sweep_space: dict
    """Default `ctray sweep` space: dotted path -> {grid|choice|uniform|loguniform: ...}."""


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    if spec.name in OBJECTIVES:
        raise ValueError(f"objective {spec.name!r} registered twice")
    OBJECTIVES[spec.name] = spec
    return spec


def get_objective(name: str) -> ObjectiveSpec:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}") from None


def no_assets(cfg) -> dict:
    return {}


register(ObjectiveSpec("ctfm_simclr", ctfm.CTFMConfig, no_assets, ctfm.patch_sampler, ctfm.CTFMTask, ctfm.synthetic_batch, {
    "objective.temperature": {"loguniform": (0.05, 0.5)},
    "objective.patches_per_scan": {"choice": [10, 15, 20]},
    "optim.lr": {"loguniform": (3e-5, 3e-4)},
}))
register(ObjectiveSpec("totalfm_mae", totalfm.TotalFMMAEConfig, no_assets, totalfm.organ_sampler, totalfm.TotalFMMAETask, totalfm.synthetic_batch, {
    "objective.mask_ratio": {"choice": [0.75, 0.9]},
    "optim.lr": {"loguniform": (1e-4, 1.5e-3)},
}))
register(ObjectiveSpec("totalfm_clip", totalfm.TotalFMCLIPConfig, totalfm.clip_assets, totalfm.organ_sampler, totalfm.TotalFMCLIPTask, totalfm.synthetic_batch, {
    "objective.temperature_init": {"choice": [0.03, 0.07, 0.1]},
    "optim.lr": {"loguniform": (1e-5, 3e-4)},
}))
register(ObjectiveSpec("cagcl", cagcl.CAGCLConfig, cagcl.cagcl_assets, cagcl.scan_sampler, cagcl.CAGCLTask, cagcl.synthetic_batch, {
    "objective.global_weight": {"grid": [0.0, 0.05, 0.1, 0.2]},
    "optim.lr": {"loguniform": (1e-5, 3e-4)},
}))

ObjectiveConfig = Annotated[
    Union[ctfm.CTFMConfig, totalfm.TotalFMMAEConfig, totalfm.TotalFMCLIPConfig, cagcl.CAGCLConfig], Field(discriminator="name")
]
"""Every registered objective's config, told apart by `name`."""
