"""Typed config of `ctray sweep` (see jobs/sweep-ctfm.yaml)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ctray.config import RayConfig, Section, StorageConfig


class ParamSpace(Section):
    """One swept config field: exactly one of the four kinds."""

    grid: list[Any] | None = None
    """Every value, in every combination with the other grid fields (tune.grid_search)."""
    choice: list[Any] | None = None
    """One value drawn per trial (tune.choice)."""
    uniform: tuple[float, float] | None = None
    """A float drawn uniformly in [low, high] (tune.uniform)."""
    loguniform: tuple[float, float] | None = None
    """A float drawn log-uniformly in [low, high] (tune.loguniform)."""

    def example(self) -> Any:
        """One value of the space (to validate the swept path before any trial runs)."""
        for values in (self.grid, self.choice, self.uniform, self.loguniform):
            if values is not None:
                return values[0]
        raise ValueError("empty space")

    @model_validator(mode="after")
    def _exactly_one(self) -> ParamSpace:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        return self


class SchedulerConfig(Section):
    """Early stopping of poor trials."""

    kind: Literal["asha", "fifo"] = "asha"
    """asha: asynchronous successive halving; fifo: every trial runs to the end."""
    metric: str = "loss"
    """A metric the pretrain loop reports (loss, positive_cosine, ...)."""
    mode: Literal["min", "max"] = "min"
    """min: a lower `metric` is better; max: a higher one."""
    grace_period: int = 2
    """Reports (train.log_every steps each) before a trial can be stopped."""
    reduction_factor: int = 2
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""


class SweepConfig(Section):
    """`ctray sweep`: a base pretrain config + a search space over its fields by dotted path."""

    base: str
    """The pretrain YAML every trial starts from (a path, relative to the working directory)."""
    overrides: list[str] = Field(default_factory=list)
    """Dotted overrides applied to the base before the swept values (shorter trials, ...)."""
    space: dict[str, ParamSpace] = Field(default_factory=dict)
    """Dotted config path -> its space. Empty: the objective's default space (temperature, patch
    count, loss weights, learning rate)."""
    search: Literal["grid", "random", "optuna"] = "random"
    """grid: every combination of every field's values (grid or choice; continuous fields are an
    error); random: Tune's sampler (grid fields are expanded, the others drawn); optuna: TPE via
    optuna (pip install optuna)."""
    num_samples: int = 4
    """Trials for random/optuna search (times the grid fields' combinations for random); repetitions
    of the whole grid for grid search."""
    max_concurrent: int | None = Field(None, ge=1)
    """Trials at once (None: all of them). Trials that do not fit wait for resources; on an
    autoscaling cluster they are what makes it add nodes. Cap it on a single machine."""
    trial_cpus: float = Field(0.5, ge=0)
    """CPUs each trial's own process reserves (it drives the trial's Ray Train run and its data
    streams). Reserving some keeps trials off a head node that offers no CPU for work (cluster/),
    where the GCS lives. 0 on one small machine, where the CPUs go to the workers and samplers."""
    trial_memory_gb: float = Field(1.0, gt=0)
    """Memory each trial's own process reserves, in GiB: it imports ctray, torch, DeepSpeed and the
    objective's models (~0.65 GiB resident, measured)."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    report_metrics: list[str] = Field(default_factory=list)
    """More metrics of each trial's last report for the results table and CSV (e.g. the zero-shot
    and text-collapse figures of an evaluation at the last step)."""
    name: str = "sweep"
    """Sweep name; re-running the same storage + name continues it."""
    storage: str = "runs/sweeps"
    """Folder or s3:// URI holding the sweep (trial runs, results table, plots, best YAML)."""
    seed: int | None = 0
    """Seed of the search algorithm (None: random)."""
    storage_options: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def trial_resources(self) -> dict[str, float]:
        """What each trial's own process reserves (trial_cpus, trial_memory_gb); its Train workers
        reserve theirs (the base config's scaling)."""
        return {"CPU": self.trial_cpus, "memory": self.trial_memory_gb * 2**30}

    def tracked_settings(self) -> dict[str, Any]:
        """What the sweep's MLflow run records as params: what it searches and how (not where it
        stores, which may name credentials-bearing URIs)."""
        return self.model_dump(
            mode="json", include={"base", "overrides", "space", "search", "num_samples", "scheduler"}
        )
