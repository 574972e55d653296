"""`ctray sweep`'s search spaces. The sweep itself (two trials at once on nodes an autoscaler adds,
ASHA, a killed sweep resumed, best.yaml) runs in test_multinode.py."""

import pytest


def test_grid_search_enumerates_every_field_and_refuses_continuous_ones():
    """search: grid is a grid: choice fields are enumerated like grid fields (Tune's grid_search),
    every combination once per sample; a continuous field cannot be enumerated and is refused.
    random keeps Tune's semantics: grid fields enumerated, choice fields drawn."""
    from ray import tune

    from ctray.errors import ConfigError
    from ctray.tune.config import ParamSpace
    from ctray.tune.sweep import grid_size, search_space

    spaces = {
        "objective.temperature": ParamSpace(grid=[0.05, 0.1, 0.2]),
        "objective.patches_per_scan": ParamSpace(choice=[10, 20]),
    }
    grid = search_space(spaces, "grid")
    assert grid["objective.temperature"] == tune.grid_search([0.05, 0.1, 0.2])
    assert grid["objective.patches_per_scan"] == tune.grid_search([10, 20])
    assert grid_size(spaces, "grid") == 6
    drawn = search_space(spaces, "random")
    assert drawn["objective.temperature"] == tune.grid_search([0.05, 0.1, 0.2])
    assert not isinstance(drawn["objective.patches_per_scan"], dict)  # a Categorical domain, drawn per trial
    assert grid_size(spaces, "random") == 3 and grid_size(spaces, "optuna") == 1
    with pytest.raises(ConfigError, match=r"'optim\.lr' is continuous"):
        search_space({**spaces, "optim.lr": ParamSpace(loguniform=(1e-5, 1e-3))}, "grid")
