"""`ctray sweep`: a 4-trial grid over the learning rate on real Ray Tune + Train + DeepSpeed (CPU).

One sweep serves the three checks: it is killed after its first trial finishes, then re-run;
finished trials are not run again, ASHA stops at least one trial early, and best.yaml is the
best trial's own config.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ctray.config import load_config
from ctray.train.config import PretrainConfig
from ctray.tune.config import SweepConfig
from ctray.tune.sweep import run_sweep

from conftest import REPO


def _finished_trials(sweep_dir: Path) -> set[str]:
    done = set()
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            for entry in json.loads(state.read_text())["trial_data"]:
                trial = json.loads(entry[0])
                if trial.get("status") == "TERMINATED":
                    done.add(trial["trial_id"])
        except (json.JSONDecodeError, KeyError, OSError):
            pass  # written while we read; look again
    return done


@pytest.mark.slow
def test_sweep_asha_best_yaml_and_resume(ray_local, train_shards, tmp_path):
    # lr 2e-3 and 5e-4 learn; 2e-5 and 1e-6 barely move, so ASHA has something to stop
    sweep = {
        "base": str(REPO / "jobs" / "ctfm-local.yaml"),
        "overrides": [
            f"data.shards={train_shards}",
            "train.max_steps=8",
            "train.log_every=2",
            "train.checkpoint_every=4",
        ],
        "space": {"optim.lr": {"grid": [0.002, 0.0005, 0.00002, 0.000001]}},
        "search": "grid",
        "num_samples": 1,
        "scheduler": {"kind": "asha", "metric": "loss", "mode": "min", "grace_period": 2, "reduction_factor": 2},
        "name": "lr",
        "storage": str(tmp_path / "sweeps"),
        "max_concurrent": 1,
        "ray": {"address": ray_local.get_runtime_context().gcs_address},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    sweep_dir = tmp_path / "sweeps" / "lr"

    # 1. a real `ctray sweep` process (a second driver on the same Ray), killed once a trial finished
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctray.cli", "sweep", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    deadline = time.time() + 600
    while time.time() < deadline and not _finished_trials(sweep_dir) and proc.poll() is None:
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = _finished_trials(sweep_dir)
    assert 1 <= len(finished) < 4, finished
    runs = sweep_dir / "trials"
    stamps = {t: (runs / t / "metrics.jsonl").stat().st_mtime_ns for t in finished}

    # 2. the same sweep again: it continues, and finished trials are not run again
    result = run_sweep(load_config(SweepConfig, path))
    assert {t: (runs / t / "metrics.jsonl").stat().st_mtime_ns for t in finished} == stamps
    rows = result["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {r["optim.lr"] for r in rows} == {0.002, 0.0005, 0.00002, 0.000001}
    assert any(r["stopped_early"] for r in rows), rows  # ASHA stopped at least one trial
    assert any(not r["stopped_early"] for r in rows)

    # 3. best.yaml is the best trial's config, and `ctray pretrain` takes it as it is
    best = result["best"]
    assert best["loss"] == min(r["loss"] for r in rows)
    chosen = load_config(PretrainConfig, sweep_dir / "best.yaml")
    ran = load_config(PretrainConfig, runs / best["trial"] / "config.yaml")
    assert chosen.optim.lr == best["optim.lr"]
    assert chosen.model_dump(exclude={"run"}) == ran.model_dump(exclude={"run"})
    assert (sweep_dir / "results.csv").read_text().count("\n") == 5
    assert (sweep_dir / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"


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
