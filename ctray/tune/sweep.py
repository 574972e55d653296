"""`ctray sweep`: Ray Tune over `ctray pretrain` (Ray 2.60's Train V2 pattern).

Each trial is a function that builds the trial's PretrainConfig (base + overrides + sampled
values) and runs the full trainer, its own Ray Train workers included, with Tune's
TuneReportCallback forwarding the loop's reports to Tune; ASHA stops poor trials on those
reports. Each trial's run lives in <storage>/<name>/trials/<trial id>, so a trial interrupted
with the sweep resumes from its own checkpoint when the sweep is re-run, and finished trials are
not run again (Tuner.restore).

Tracking: each trial logs like any pretrain run (the base's run.loggers), nested in MLflow under
the sweep's own run, which ends with the results table, plot and best config; W&B groups the
trials by the sweep's name. Tune's MLflowLoggerCallback / WandbLoggerCallback are not used: why
is in ctray.train.tracking.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import posixpath
from typing import Any

import yaml

from ctray.config import apply_overrides, load_config, to_yaml
from ctray.data.pipeline import place_data_actors_here
from ctray.errors import ConfigError
from ctray.run_folder import RunFolder
from ctray.runtime import ensure_ray, ensure_schedulable
from ctray.storage import arrow_filesystem, filesystem, is_remote, publish_bytes, resolve_uri
from ctray.train import tracking
from ctray.train.config import PretrainConfig
from ctray.tune.config import ParamSpace, SweepConfig

log = logging.getLogger(__name__)


def search_space(spaces: dict[str, ParamSpace], search: str) -> dict[str, Any]:
    """Dotted path -> Tune domain. Keys keep their dots (Tune's config is flat here).

    grid: every field is enumerated (grid and choice values alike), every combination once per
    `num_samples`; a continuous field is an error. random: grid fields are enumerated, the others
    drawn. optuna: every field is drawn by TPE (grid values become a choice)."""
    from ray import tune

    out: dict[str, Any] = {}
    for path, space in spaces.items():
        values = space.grid if space.grid is not None else space.choice
        if search == "grid":
            if values is None:
                raise ConfigError(
                    f"search: grid enumerates every field, but {path!r} is continuous; give it grid values "
                    "(or use search: random)"
                )
            out[path] = tune.grid_search(list(values))
        elif space.grid is not None:
            out[path] = tune.grid_search(list(space.grid)) if search != "optuna" else tune.choice(list(space.grid))
        elif space.choice is not None:
            out[path] = tune.choice(list(space.choice))
        elif space.uniform is not None:
            out[path] = tune.uniform(*space.uniform)
        elif space.loguniform is not None:
            out[path] = tune.loguniform(*space.loguniform)
    return out


def grid_size(spaces: dict[str, ParamSpace], search: str) -> int:
    """Trials per sample: the product of the enumerated fields' sizes (1 for optuna)."""
    sizes = [
        len(s.grid if s.grid is not None else s.choice or [])
        for s in spaces.values()
        if (search == "grid" and (s.grid is not None or s.choice is not None))
        or (search == "random" and s.grid is not None)
    ]
    return math.prod(sizes)


def trial_config(base: dict, params: dict) -> PretrainConfig:
    """The base config with a trial's sampled values set (validated like any config)."""
    return PretrainConfig.model_validate(
        apply_overrides(
            base, [f"{k}={yaml.safe_dump(v).strip().removesuffix('...').strip()}" for k, v in params.items()]
        )
    )


def _trial(params: dict, base: dict, trials_root: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ctray.train.trainer import run_pretrain

    cfg = trial_config(base, params)
    cfg.run.storage = trials_root
    cfg.run.name = tune.get_context().get_trial_id()  # stable across Tuner.restore: the trial resumes its own run
    run_pretrain(cfg, callbacks=[TuneReportCallback()])


def _spaces(cfg: SweepConfig, base: PretrainConfig) -> dict[str, ParamSpace]:
    if cfg.space:
        return cfg.space
    from ctray.objectives import get_objective

    return {k: ParamSpace.model_validate(v) for k, v in get_objective(base.objective.name).sweep_space.items()}


def reports_per_run(cfg: PretrainConfig) -> int:
    """How many reports a trial makes (ASHA's max_t): every step the loop's cadence reports at."""
    from ctray.ingest.shardset import ShardSet
    from ctray.train.metrics import Cadence
    from ctray.train.trainer import steps_for_epochs

    steps = (
        cfg.train.steps
        if cfg.train.epochs is None
        else steps_for_epochs(cfg, len(ShardSet.open(cfg.data.shards, cfg.storage).scans()))
    )
    cadence = Cadence(
        cfg.train.model_copy(update={"max_steps": steps, "epochs": None}), cfg.eval.every if cfg.eval.enabled else -1
    )
    return sum(cadence.reports(step) for step in range(1, steps + 1))


def run_sweep(cfg: SweepConfig) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    base_cfg = load_config(PretrainConfig, cfg.base, cfg.overrides)
    base_cfg.data.shards = resolve_uri(base_cfg.data.shards)
    spaces = _spaces(cfg, base_cfg)
    base = base_cfg.model_dump(mode="json")
    for path, space in spaces.items():  # a typo in a swept path fails now, not in every trial
        try:
            trial_config(base, {path: space.example()})
        except Exception as e:
            raise ConfigError(f"sweep space {path!r}: {e}") from e

    storage = resolve_uri(cfg.storage)
    sweep_dir = posixpath.join(storage, cfg.name)
    parent = tracking.start_sweep(cfg.name, cfg.tracked_settings(), base_cfg, RunFolder(sweep_dir, cfg.storage_options))
    # The trials' MLflow runs nest under the sweep's own; W&B groups them by the sweep's name.
    base["run"]["group"] = base["run"]["group"] or cfg.name
    base["run"]["mlflow"]["parent_run_id"] = parent
    from ctray.train.trainer import preflight

    preflight(base_cfg)  # every trial would refuse the same config: once here, before Tune starts any
    ensure_ray(cfg.ray)
    place_data_actors_here()  # before any trial runs a dataset on a worker node
    scaling = base_cfg.scaling
    ensure_schedulable(cfg.trial_resources(), "trial", cfg.ray.schedule_timeout_s)
    ensure_schedulable(scaling.worker_bundle(), "training worker of a trial", cfg.ray.schedule_timeout_s)
    param_space = search_space(spaces, cfg.search)  # a grid search over a continuous field fails here
    trials = cfg.num_samples * grid_size(spaces, cfg.search)
    # Every trial at once unless capped: on an autoscaling cluster, pending trials (their Train
    # workers' placement groups) are the demand that makes it add GPU nodes.
    concurrent = min(cfg.max_concurrent or trials, trials)

    sched_cfg = cfg.scheduler
    max_reports = reports_per_run(base_cfg)
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_reports,
            grace_period=sched_cfg.grace_period,
            reduction_factor=sched_cfg.reduction_factor,
        )
        if sched_cfg.kind == "asha"
        else FIFOScheduler()
    )
    search_alg = None
    if cfg.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError("search: optuna needs `pip install optuna`") from e
        search_alg = OptunaSearch(seed=cfg.seed)

    afs, path = arrow_filesystem(storage, cfg.storage_options)
    remote = is_remote(storage)
    trial_fs = afs if remote else None
    trainable = tune.with_parameters(_trial, base=base, trials_root=posixpath.join(sweep_dir, "trials"))
    trainable = tune.with_resources(trainable, cfg.trial_resources())
    experiment = posixpath.join(path, cfg.name) if remote else sweep_dir
    if tune.Tuner.can_restore(experiment, storage_filesystem=trial_fs):
        log.info("sweep %s: continuing from %s (finished trials are kept)", cfg.name, sweep_dir)
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=trial_fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sched_cfg.metric,
                mode=sched_cfg.mode,
                scheduler=scheduler,
                search_alg=search_alg,
                num_samples=cfg.num_samples,
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(name=cfg.name, storage_path=path, storage_filesystem=trial_fs),
        )
    log.info(
        "sweep %s: %d swept fields, search %s, scheduler %s, %d trial(s) at once -> %s",
        cfg.name,
        len(spaces),
        cfg.search,
        sched_cfg.kind,
        concurrent,
        sweep_dir,
    )
    results = tuner.fit()
    out = _report(cfg, base, spaces, results, sweep_dir)
    if parent is not None:
        files = ["results.csv", "best.yaml", "metric_vs_params.png"]
        best = {f"best_{sched_cfg.metric}": float(out["best"][sched_cfg.metric])}
        tracking.end_sweep(base_cfg, parent, RunFolder(sweep_dir, cfg.storage_options), files, best)
    return out


def _report(cfg: SweepConfig, base: dict, spaces: dict[str, ParamSpace], results: Any, sweep_dir: str) -> dict:
    metric, mode = cfg.scheduler.metric, cfg.scheduler.mode
    rows = []
    for r in results:
        params = {k: r.config.get(k) for k in spaces}
        rows.append(
            {
                "trial": (r.metrics or {}).get("trial_id", ""),
                **params,
                metric: r.metrics.get(metric) if r.metrics else None,
                **{m: (r.metrics or {}).get(m) for m in cfg.report_metrics if m != metric},
                "reports": r.metrics.get("training_iteration") if r.metrics else 0,
                "step": r.metrics.get("step") if r.metrics else None,
                "status": "error" if r.error else "ok",
            }
        )
    good = [row for row in rows if row[metric] is not None and row["status"] == "ok"]
    if not good:
        raise ConfigError(f"sweep {cfg.name}: no trial reported {metric!r}")
    best = (min if mode == "min" else max)(good, key=lambda row: row[metric])
    max_reports = max(row["reports"] or 0 for row in rows)
    for row in rows:
        row["stopped_early"] = (row["reports"] or 0) < max_reports

    fs, root = filesystem(cfg.storage, cfg.storage_options)
    root = posixpath.join(root, cfg.name)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(
        sorted(rows, key=lambda row: (row[metric] is None, row[metric] if mode == "min" else -(row[metric] or 0)))
    )
    publish_bytes(buf.getvalue().encode(), fs, posixpath.join(root, "results.csv"), cfg.storage_options)
    best_cfg = trial_config(base, {k: best[k] for k in spaces})
    best_cfg.run.name = f"{cfg.name}-best"
    best_cfg.run.mlflow.parent_run_id = None  # a run of its own, no longer one of the sweep's trials
    publish_bytes(to_yaml(best_cfg).encode(), fs, posixpath.join(root, "best.yaml"), cfg.storage_options)
    publish_bytes(_plot(rows, spaces, metric), fs, posixpath.join(root, "metric_vs_params.png"), cfg.storage_options)

    print(_table(rows, list(spaces), [metric, *(m for m in cfg.report_metrics if m != metric)]))
    print(f"best: trial {best['trial']} {metric}={best[metric]:.4f} " + " ".join(f"{k}={best[k]}" for k in spaces))
    log.info(
        "sweep %s done: %d trials, %d stopped early; table %s; plot %s; best config %s",
        cfg.name,
        len(rows),
        sum(r["stopped_early"] for r in rows),
        posixpath.join(sweep_dir, "results.csv"),
        posixpath.join(sweep_dir, "metric_vs_params.png"),
        posixpath.join(sweep_dir, "best.yaml"),
    )
    return {"rows": rows, "best": best, "best_yaml": posixpath.join(sweep_dir, "best.yaml")}


def _table(rows: list[dict], params: list[str], metrics: list[str]) -> str:
    cols = ["trial", *params, *metrics, "reports", "stopped_early"]
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) for r in cells]
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plot(rows: list[dict], spaces: dict[str, ParamSpace], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spaces), figsize=(4 * len(spaces), 3.2), squeeze=False)
    for ax, (path, space) in zip(axes[0], spaces.items(), strict=False):
        pts = [(row[path], row[metric], row["stopped_early"]) for row in rows if row[metric] is not None]
        numeric = all(isinstance(x, (int, float)) for x, _, _ in pts)
        xs = [x if numeric else str(x) for x, _, _ in pts]
        colors = ["tab:gray" if early else "tab:blue" for _, _, early in pts]
        ax.scatter(xs, [y for _, y, _ in pts], c=colors)
        positive = numeric and pts and min(x for x, _, _ in pts) > 0
        if space.loguniform is not None or (positive and max(x for x, _, _ in pts) / min(x for x, _, _ in pts) > 20):
            ax.set_xscale("log")
        ax.set_xlabel(path)
        ax.set_ylabel(f"{metric} (last report)")
    fig.suptitle("gray: stopped early by the scheduler", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
