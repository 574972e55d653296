"""The objective registry: one `Objective` (ctray.objectives.spec) per recipe folder. The config
loader, the trainer, the CLI, `ctray bench step` and `ctray sweep` ask it; none of them names a
recipe.

Entries are "module:attribute" strings, imported on first use: `ctray --help` and Ray Data's
sampler processes (which import a recipe's sampler module, and so this package) must not pay for
torch and MONAI.

To add a recipe: a folder beside ctfm/ with its config (a `RecipeConfig` whose `name` is a
Literal), a numpy-only sampler, a `Task` and an `Objective` instance, then one line in `RECIPES` and
`CONFIGS` below (or `register(...)` from your own code before the config is loaded). The README's "Add
an objective" section walks through a 40-line one (tests/integration/test_registry.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ctray.errors import ConfigError

if TYPE_CHECKING:
    from ctray.objectives.config import RecipeConfig
    from ctray.objectives.spec import Objective

RECIPES: dict[str, str] = {
    "ctfm_simclr": "ctray.objectives.ctfm.recipe:OBJECTIVE",
    "totalfm_mae": "ctray.objectives.totalfm.recipe:MAE",
    "totalfm_clip": "ctray.objectives.totalfm.recipe:CLIP",
    "cagcl": "ctray.objectives.cagcl.recipe:OBJECTIVE",
}
"""Objective name -> where its Objective lives."""

CONFIGS: dict[str, str] = {
    "ctfm_simclr": "ctray.objectives.ctfm.config:CTFMConfig",
    "totalfm_mae": "ctray.objectives.totalfm.config:TotalFMMAEConfig",
    "totalfm_clip": "ctray.objectives.totalfm.config:TotalFMCLIPConfig",
    "cagcl": "ctray.objectives.cagcl.config:CAGCLConfig",
}
"""Objective name -> its config class, importable without torch: validating a job's `objective:`
section must not import the recipe (torch, transformers, MONAI)."""

_LOADED: dict[str, Objective[Any]] = {}


def objective_names() -> list[str]:
    """Every registered name, without importing any recipe (CLI choices)."""
    return sorted(RECIPES.keys() | _LOADED.keys())


def register(objective: Objective[Any]) -> Objective[Any]:
    """Add an objective from your own code; its name must be new and its config's `name` default."""
    if objective.name in RECIPES or objective.name in _LOADED:
        raise ValueError(f"objective {objective.name!r} registered twice")
    _check(objective.name, objective)
    _LOADED[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective[Any]:
    if name not in _LOADED:
        if name not in RECIPES:
            raise ConfigError(f"unknown objective {name!r}; known: {', '.join(objective_names())}")
        module, attr = RECIPES[name].split(":")
        _LOADED[name] = _check(name, getattr(importlib.import_module(module), attr))
    return _LOADED[name]


def _check(name: str, objective: Objective[Any]) -> Objective[Any]:
    if name in CONFIGS and CONFIGS[name] != f"{objective.config.__module__}:{objective.config.__qualname__}":
        raise ValueError(f"objective {name!r}: CONFIGS names another config class than the objective's")
    default = objective.config.model_fields["name"].default
    if objective.name != name or default != name:
        raise ValueError(
            f"objective {name!r}: registered as {objective.name!r}, its config's name defaults to {default!r}"
        )
    return objective


def objective_config(value: Any) -> RecipeConfig:
    """A job's `objective:` section validated into the config type its `name` registers (what a
    discriminated union would do, but open to objectives registered after import)."""
    from ctray.objectives.config import RecipeConfig

    if isinstance(value, RecipeConfig):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError(f"needs a `name`, one of {objective_names()}")
    if value["name"] not in objective_names():
        raise ValueError(f"unknown objective {value['name']!r}; known: {', '.join(objective_names())}")
    return config_class(value["name"]).model_validate(value)


def config_class(name: str) -> type[RecipeConfig]:
    """The config class of a registered objective, without importing its recipe where CONFIGS
    names it."""
    if name in _LOADED or name not in CONFIGS:
        return get_objective(name).config
    module, attr = CONFIGS[name].split(":")
    config: type[RecipeConfig] = getattr(importlib.import_module(module), attr)
    return config
