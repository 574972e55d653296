"""Experiment tracking: MLflow and Weights & Biases beside the run's own metrics.jsonl and TensorBoard.

Who logs what (`run.loggers`):
- The driver (`start`, before the workers) opens the run, or reopens the one whose ids
  <run>/tracking.json holds, so a resumed run and every attempt ctray restarts continue one MLflow
  run and one W&B run; it logs the config (redacted params + config.yaml) and, after the fit, the
  MLflow run's end status (a rank 0 that died cannot report its own failure).
- Rank 0 (ctray.train.loggers: MlflowLogger, WandbLogger) logs each report's metrics at its step,
  each evaluation folder (eval/step_N) and, once every rank has finished writing it, export/ as
  artifacts. A W&B run lives in the process that opened it, so all of W&B is logged there.

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
import secrets
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        wandb_dir = cfg.run.wandb.dir or (None if is_remote(run.uri) else run.path())
        ids["wandb"] = {
            "id": (saved.get("wandb") or {}).get("id") or secrets.token_hex(4),
            "mode": wandb_mode(cfg),
            "dir": wandb_dir,
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


def log_evaluation(run: RunFolder, step: int, metrics: dict[str, float], report: RunFolder, name: str) -> str | None:
    """A `ctray eval` report into the MLflow run of the training run that made the export (its
    tracking.json): the report's scalars at the export's step, prefixed `eval/<name>/`, and the
    report folder as artifacts under eval/<name>. Returns the run id (None: the run tracked
    nothing in MLflow). A server that fails is warned about: the report is written either way."""
    saved = _read_ids(run).get("mlflow")
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
