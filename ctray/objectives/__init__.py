"""The objective registry: an objective is a spec owning its config, CPU sampler, device task
(augmentation + model + loss) and export. The trainer knows nothing about any one paper.

To add one: a module with a `Section` config whose `name` is a Literal, a sampler class (Ray Data
map_batches UDF in ctray.data.samplers with a `columns` attribute naming the shard columns it reads) and a task
nn.Module whose forward(batch) returns a dict with "loss", "views" and any metrics; then a
`register(ObjectiveSpec(...))` line below and the config in `ObjectiveConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Union

from pydantic import Field
from torch import nn

from ctray.objectives.ctfm import CTFMConfig, CTFMTask, patch_sampler, synthetic_batch


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    config: type
    sampler: Callable[..., Callable[[dict], dict]]
    """config -> map_batches UDF (from ctray.data.samplers: numpy only, so Ray Data's task processes
    do not import torch); its attribute `columns` lists the shard columns it reads."""
    task: Callable[..., nn.Module]
    """config -> nn.Module with forward(batch) -> {"loss", "views", ...}, export_module(), export_config()."""
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


register(ObjectiveSpec("ctfm_simclr", CTFMConfig, patch_sampler, CTFMTask, synthetic_batch, {
    "objective.temperature": {"loguniform": (0.05, 0.5)},
    "objective.patches_per_scan": {"choice": [10, 15, 20]},
    "optim.lr": {"loguniform": (3e-5, 3e-4)},
}))

ObjectiveConfig = Annotated[Union[CTFMConfig], Field(discriminator="name")]
"""Every registered objective's config, told apart by `name`."""
