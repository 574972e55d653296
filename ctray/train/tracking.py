"""Experiment tracking: MLflow and Weights & Biases beside the run's own metrics.jsonl and TensorBoard.

Who logs what (`run.loggers`):
- The driver (`start`, before the workers) opens the run, or reopens the one whose ids
  <run>/tracking.json holds, so a resumed run and every attempt ctray restarts continue one MLflow
  run and one W&B run; it logs the config (redacted params + config.yaml) and, after the fit, the
  MLflow run's end status (a rank 0 that died cannot report its own failure).
- Rank 0 (ctray.train.loggers: MlflowLogger, WandbLogger) logs each report's metrics at its step,
  each evaluation folder (eval/step_N) and, once every rank has finished writing it, export/ as
  artifacts. A W&B run lives in the process that opened it, so all of the training's W&B is
  logged there.
- `ctray eval` of a run's export (`log_evaluation`) logs the report into the same MLflow run and
  resumes the same W&B run, after the training.

Why not Ray's integrations: `setup_mlflow` and `setup_wandb` start a new run on every call (a resumed
run or a restarted attempt would become a second run), and Tune's `MLflowLoggerCallback` keeps its
trial -> run map in memory (a restored sweep opens new runs), logs at Tune's iteration instead of the
step, and sees only the reported metrics. So a sweep's trials log through this module as well,
nested under one MLflow run of the sweep (`start_sweep`) and grouped in W&B by the sweep's name.

Nothing here logs report text or scan ids: metrics and evaluation files are aggregates. Config values
that look like credentials are redacted before they leave the run (ctray.redact).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml

from ctray.errors import ConfigError, first_line
from ctray.redact import redact_text, redacted
from ctray.run_folder import RunFolder
from ctray.storage import is_remote, local_folder

if TYPE_CHECKING:
    from ctray.train.config import PretrainConfig

log = logging.getLogger(__name__)

IDS_FILE = "tracking.json"
"""In a run (or sweep) folder: the MLflow run id and W&B run id a re-run continues."""
_INSTALL = "pip install 'ctray[tracking]'"
_PARAM_CHARS = 500  # MLflow caps a param value (6000); the whole config is the config.yaml artifact


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params with dotted keys ({"optim.lr": "0.002", ...})."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text if len(text) <= _PARAM_CHARS else text[: _PARAM_CHARS - 3] + "..."
    return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """A report's numeric metrics, without its step and wall time."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _require(module: str, logger: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"run.loggers has {logger} but {module} is not installed: {_INSTALL}")


def mlflow_uri(cfg: PretrainConfig) -> str:
    """The tracking URI: run.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI. There is no default: MLflow's
    own (./mlflow.db of the logging process) would be on whichever node rank 0 ran."""
    uri = cfg.run.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(
            "run.loggers has mlflow but no tracking server: set run.mlflow.tracking_uri (http://host:5000) "
            "or MLFLOW_TRACKING_URI"
        )
    return uri


def wandb_mode(cfg: PretrainConfig) -> str:
    """run.wandb.mode, else $WANDB_MODE, else online with a WANDB_API_KEY and offline without one."""
    return (
        cfg.run.wandb.mode
        or os.environ.get("WANDB_MODE")
        or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    )


def wandb_dir(cfg: PretrainConfig, run: RunFolder) -> str | None:
    """Where W&B writes its wandb/ folder: run.wandb.dir, else the run folder when it is local.
    None (object storage): a temporary folder, whose offline run `keep_wandb_offline` copies to <run>/wandb."""
    return cfg.run.wandb.dir or (None if is_remote(run.uri) else run.path())


def wandb_safe(text: str) -> str:
    """A W&B artifact name: word characters, dashes and dots only (W&B refuses a "/"; the rest keeps
    names plain), at most W&B's 128 characters."""
    return re.sub(r"[^\w.-]", "-", text)[:128]


def open_wandb(
    cfg: PretrainConfig, run_id: str, mode: str, directory: str, config: dict[str, Any] | None = None
) -> Any:
    """The run's W&B run, created or resumed (same id): one opener for the training's rank 0 and
    `ctray eval`, so both reach the same run. `config` must be redacted already; None leaves the
    run's config as the training logged it."""
    import wandb

    os.makedirs(directory, exist_ok=True)
    return wandb.init(
        project=cfg.run.wandb.project,
        id=run_id,
        name=cfg.run.name,
        group=cfg.run.group,
        config=config,
        mode=cast(Any, mode),  # $WANDB_MODE may name any of W&B's modes: W&B itself checks it
        dir=directory,
        resume="allow",
        # No console capture (Ray owns the worker's output), no run summary printed at the end, and no
        # machine metadata (argv, host, git).
        settings=wandb.Settings(
            console="off",
            quiet=True,
            x_disable_meta=True,
            disable_git=True,
            save_code=False,
            x_save_requirements=False,
        ),
    )


def keep_wandb_offline(folder: RunFolder, sync_dir: str) -> None:
    """An offline run W&B wrote in a temporary folder (<tmp>/wandb/offline-run-*), copied to
    <run>/wandb/ so that `wandb sync` can upload it after the temporary folder is gone."""
    for path in Path(sync_dir).rglob("*"):
        if path.is_file():
            rel = path.relative_to(os.path.dirname(sync_dir)).as_posix()
            folder.write(f"wandb/{rel}", path.read_bytes())
    log.info("wandb: offline run in %s (upload: wandb sync)", folder.uri_of("wandb"))


def _read_ids(folder: RunFolder) -> dict[str, Any]:
    return json.loads(folder.read(IDS_FILE)) if folder.exists(IDS_FILE) else {}


def _write_ids(folder: RunFolder, ids: dict[str, Any]) -> None:
    stored: dict[str, Any] = {}
    if "mlflow" in ids:
        # The URI as it may be shown: a re-run compares it to know the run id is on the same server.
        stored["mlflow"] = {
            "tracking_uri": redact_text(ids["mlflow"]["tracking_uri"]),
            "run_id": ids["mlflow"]["run_id"],
        }
    if "wandb" in ids:
        stored["wandb"] = {"id": ids["wandb"]["id"]}
    folder.write(IDS_FILE, json.dumps(stored, indent=1).encode())


def mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return str(client.create_experiment(name))
        except MlflowException:  # another trial of the sweep created it first
            found = client.get_experiment_by_name(name)
    if found is None or found.lifecycle_stage != "active":
        raise ConfigError(f"MLflow experiment {name!r} is deleted: restore it, or set run.mlflow.experiment")
    return str(found.experiment_id)


def _log_params(client: Any, run: Any, params: dict[str, str]) -> None:
    """The params MLflow does not have yet; a value that changed since the run began (a resumed run with
    another max_steps) keeps its first value in MLflow, which refuses a change: config.yaml is current."""
    from mlflow.entities import Param

    old = run.data.params
    changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
    if changed:
        log.warning("mlflow: params keep their first values, changed since: %s", ", ".join(changed[:8]))
    new = [Param(k, v) for k, v in params.items() if k not in old]
    for i in range(0, len(new), 100):  # MLflow's limit per batch
        client.log_batch(run.info.run_id, params=new[i : i + 100])


def _open_mlflow_run(
    uri: str, saved: dict[str, Any] | None, experiment: str, name: str, tags: dict[str, str], params: dict[str, str]
) -> str:
    """The saved run when it is on this server and not deleted (set RUNNING again), else a new one."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(uri)
    found = None
    if saved and saved.get("tracking_uri") == redact_text(uri):
        try:
            found = client.get_run(saved["run_id"])
        except MlflowException:
            found = None
        if found is None or found.info.lifecycle_stage != "active":
            log.warning("mlflow: run %s is gone from %s; starting a new run", saved["run_id"], redact_text(uri))
            found = None
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
    else:
        found = client.create_run(_experiment_id(client, experiment), run_name=name, tags=tags)
    _log_params(client, found, params)
    return str(found.info.run_id)


def start(cfg: PretrainConfig, run: RunFolder) -> dict[str, Any]:
    """The driver's side before the workers start: open or reopen the run's MLflow and W&B runs, log the
    config, store their ids in the run folder. Returns what rank 0's loggers need ({} when
    run.loggers has neither). A missing package or tracking server is a one-line ConfigError here,
    before any worker starts."""
    wanted = [name for name in ("mlflow", "wandb") if name in cfg.run.loggers]
    for name in wanted:
        _require(name, name)
    if not wanted:
        return {}
    saved = _read_ids(run)
    ids: dict[str, Any] = {}
    config = redacted(cfg.model_dump(mode="json"))
    if "mlflow" in wanted:
        uri = mlflow_uri(cfg)
        tags = {"ctray.run": redact_text(run.uri), "ctray.objective": cfg.objective.name}
        if cfg.run.group:
            tags["ctray.group"] = cfg.run.group
        if cfg.run.mlflow.parent_run_id:
            tags["mlflow.parentRunId"] = cfg.run.mlflow.parent_run_id  # how MLflow nests runs
        try:
            run_id = _open_mlflow_run(
                uri, saved.get("mlflow"), cfg.run.mlflow.experiment, cfg.run.name, tags, flat_params(config)
            )
            mlflow_client(uri).log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"mlflow at {redact_text(uri)}: {type(e).__name__}: {first_line(e)}") from e
        ids["mlflow"] = {"tracking_uri": uri, "run_id": run_id}
        log.info("mlflow: run %s in experiment %r at %s", run_id, cfg.run.mlflow.experiment, redact_text(uri))
    if "wandb" in wanted:
        ids["wandb"] = {
            "id": (saved.get("wandb") or {}).get("id") or secrets.token_hex(4),
            "mode": wandb_mode(cfg),
            "dir": wandb_dir(cfg, run),
            # Redacted here: the driver's environment is the one a ${VAR} in the config was read from.
            "config": config,
        }
        log.info("wandb: run %s (%s) in project %r", ids["wandb"]["id"], ids["wandb"]["mode"], cfg.run.wandb.project)
    _write_ids(run, ids)
    return ids


def end(ids: dict[str, Any], status: str) -> None:
    """The MLflow run's end status (FINISHED, FAILED, KILLED), from the driver after the fit."""
    if "mlflow" not in ids:
        return
    try:
        mlflow_client(ids["mlflow"]["tracking_uri"]).set_terminated(ids["mlflow"]["run_id"], status)
    except Exception as e:  # the run is over either way: its status is a courtesy
        log.warning("mlflow: could not mark run %s %s: %s", ids["mlflow"]["run_id"], status, first_line(e))


def start_sweep(name: str, settings: dict[str, Any], base: PretrainConfig, folder: RunFolder) -> str | None:
    """The sweep's own MLflow run, the parent its trials nest under (None without mlflow in the base's
    run.loggers); a re-run sweep reopens it from <sweep>/tracking.json. W&B groups the trials by
    the sweep's name instead (run.group)."""
    if "mlflow" not in base.run.loggers:
        return None
    _require("mlflow", "mlflow")
    uri = mlflow_uri(base)
    settings = redacted(settings)
    try:
        run_id = _open_mlflow_run(
            uri,
            _read_ids(folder).get("mlflow"),
            base.run.mlflow.experiment,
            name,
            {"ctray.sweep": name},
            flat_params(settings),
        )
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"mlflow at {redact_text(uri)}: {type(e).__name__}: {first_line(e)}") from e
    _write_ids(folder, {"mlflow": {"tracking_uri": uri, "run_id": run_id}})
    return run_id


def end_sweep(base: PretrainConfig, run_id: str, folder: RunFolder, files: list[str], best: dict[str, float]) -> None:
    """The sweep's results (table, plot, best config) and best metric on its MLflow run, then FINISHED."""
    uri = mlflow_uri(base)
    try:
        client = mlflow_client(uri)
        with tempfile.TemporaryDirectory(prefix="ctray-sweep-") as tmp:
            for name in files:
                Path(tmp, name).write_bytes(folder.read(name))
            client.log_artifacts(run_id, tmp)
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in best.items() if math.isfinite(v)])
        client.set_terminated(run_id, "FINISHED")
    except Exception as e:  # the sweep's own outputs are written already
        log.warning("mlflow: could not log the sweep's results to run %s: %s", run_id, first_line(e))


def _metric(key: str, value: float, step: int = 0, stamp: int | None = None) -> Any:
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000) if stamp is None else stamp, step)


@dataclass(frozen=True)
class EvaluationLogged:
    """Where `log_evaluation` logged a report: the training's MLflow run id and W&B run id, None
    where the run tracked nothing there or the logging failed (warned about)."""

    mlflow: str | None = None
    wandb: str | None = None


def log_evaluation(
    run: RunFolder, step: int, metrics: dict[str, float], report: RunFolder, name: str
) -> EvaluationLogged:
    """A `ctray eval` report into the runs the training run that made the export tracked (its
    tracking.json), so an export's evaluation sits beside its training curves:
    - MLflow: the report's scalars at the export's step, prefixed `eval/<name>/`, and the report
      folder as artifacts under eval/<name>.
    - W&B: the run resumed (same id, project, mode and folder as the training: its config.yaml), the
      finite scalars prefixed `eval/<name>/` in the run's summary and as one history row whose x-axis
      is `eval/<name>/step` (W&B drops a row at a step below the run's last, and an export's step is
      the last at best), and the report folder as an `evaluation` artifact.
    A tracker that fails is warned about in one line: the report is written either way."""
    saved = _read_ids(run)
    return EvaluationLogged(
        mlflow=_mlflow_evaluation(saved.get("mlflow"), step, metrics, report, name),
        wandb=_wandb_evaluation(run, saved.get("wandb"), step, metrics, report, name),
    )


def _mlflow_evaluation(
    saved: dict[str, Any] | None, step: int, metrics: dict[str, float], report: RunFolder, name: str
) -> str | None:
    if not saved:
        return None
    uri = saved["tracking_uri"] if "***" not in saved["tracking_uri"] else os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        log.warning("mlflow: %s names a server with credentials; set MLFLOW_TRACKING_URI to log the report", IDS_FILE)
        return None
    try:
        client = mlflow_client(uri)
        stamp = int(time.time() * 1000)
        values = [_metric(f"eval/{name}/{k}", v, step, stamp) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(values), 1000):  # MLflow's limit per batch
            client.log_batch(saved["run_id"], metrics=values[i : i + 1000])
        with local_folder(report.uri, report.storage) as local:
            client.log_artifacts(saved["run_id"], local, f"eval/{name}")
    except Exception as e:  # the report is published already
        log.warning("mlflow: could not log the evaluation to run %s: %s", saved["run_id"], first_line(e))
        return None
    log.info("mlflow: evaluation %s logged to run %s", name, saved["run_id"])
    return str(saved["run_id"])


def _wandb_evaluation(
    run: RunFolder, saved: dict[str, Any] | None, step: int, metrics: dict[str, float], report: RunFolder, name: str
) -> str | None:
    if not saved:
        return None
    run_id = str(saved["id"])
    try:
        import wandb

        from ctray.train.config import PretrainConfig

        # The settings the training opened the run with. Validated as stored, not through load_config:
        # config.yaml holds the values ${VAR}s expanded to, which must not be expanded again. Only its
        # W&B settings and names are used: the config the run logged (redacted) stays as it is.
        cfg = PretrainConfig.model_validate(yaml.safe_load(run.read("config.yaml")))
        mode, directory = wandb_mode(cfg), wandb_dir(cfg, run)
        temp = tempfile.mkdtemp(prefix="ctray-wandb-") if directory is None else None
        try:
            wb = open_wandb(cfg, run_id, mode, directory or str(temp))
            sync_dir = os.path.dirname(wb.dir)
            try:
                prefix = f"eval/{name}/"
                values = {prefix + k: v for k, v in scalars(metrics).items() if math.isfinite(v)}
                wb.summary.update(values)
                wb.define_metric(f"{prefix}step")
                wb.define_metric(f"{prefix}*", step_metric=f"{prefix}step")
                # No step=: W&B's own step only grows, and this row belongs at the export's step.
                wb.log({**values, f"{prefix}step": step})
                artifact = wandb.Artifact(wandb_safe(f"{cfg.run.name}-eval-{name}"), type="evaluation")
                with local_folder(report.uri, report.storage) as local:
                    artifact.add_dir(local)
                    wb.log_artifact(artifact, aliases=[f"step_{step}"])
            finally:
                # Exit code 0 even after a failure here: the run's state is the training's, not the report's.
                wb.finish()
            if temp is not None and mode == "offline":
                keep_wandb_offline(run, sync_dir)
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
    except Exception as e:  # the report is published already
        log.warning("wandb: could not log the evaluation to run %s: %s", run_id, first_line(e))
        return None
    log.info("wandb: evaluation %s logged to run %s", name, run_id)
    return run_id
