"""Experiment tracking: MLflow and Weights & Biases beside the run's own metrics.jsonl and TensorBoard.

Who logs what (`run.loggers`):
- The driver (`start`, before the workers) opens the run, or reopens the one whose ids
  <run>/tracking.json holds, so a resumed run and every attempt ctray restarts continue one MLflow
  run and one W&B run; it logs the config (redacted params + config.yaml) and, after the fit, the
  MLflow run's end status (a rank 0 that died cannot report its own failure).
- Rank 0 (`Tracker`) logs each report's metrics at its step, each evaluation folder (eval/step_N)
  and, once every rank has finished writing it, export/ as artifacts. A W&B run lives in the process
  that opened it, so all of W&B is logged there.

Why not Ray's integrations: `setup_mlflow` and `setup_wandb` start a new run on every call (a resumed
run or a restarted attempt would become a second run), and Tune's `MLflowLoggerCallback` keeps its
trial -> run map in memory (a restored sweep opens new runs), logs at Tune's iteration instead of the
step, and sees only the reported metrics. So a sweep's trials log through this module as well,
nested under one MLflow run of the sweep (`start_sweep`) and grouped in W&B by the sweep's name.

Nothing here logs report text or scan ids: metrics and evaluation files are aggregates. Config values
that look like credentials are redacted before they leave the run (`redacted`).
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ctray.errors import ConfigError, first_line
from ctray.run_folder import RunFolder
from ctray.storage import is_remote, local_folder

if TYPE_CHECKING:
    from ctray.train.config import PretrainConfig
    from ctray.tune.config import SweepConfig

log = logging.getLogger(__name__)

IDS_FILE = "tracking.json"
"""In a run (or sweep) folder: the MLflow run id and W&B run id a re-run continues."""
REDACTED = "***"
_INSTALL = "pip install 'ctray[tracking]'"
_PARAM_CHARS = 500  # MLflow caps a param value (6000); the whole config is the config.yaml artifact
_SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "credential", "credentials"})
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_QUERY = re.compile(
    r"([?&][^=&#\s]*(?:key|secret|token|signature|sig|password|credential)[^=&#\s]*=)[^&#\s]+", re.IGNORECASE
)


def _secret_name(name: str) -> bool:
    return bool(_SECRET_WORDS & set(re.split(r"[^a-z0-9]+", name.lower())))


def redact_text(text: str) -> str:
    """`text` without URL userinfo (user:password@), credential-like query values (?token=...) and the
    values of this process's secret-named environment variables (AWS_SECRET_ACCESS_KEY, ..._TOKEN):
    a `${VAR}` in a config may have put one anywhere."""
    text = _SECRET_QUERY.sub(r"\1" + REDACTED, _USERINFO.sub(REDACTED + "@", text))
    for name, value in os.environ.items():
        if len(value) >= 8 and _secret_name(name) and value in text:
            text = text.replace(value, REDACTED)
    return text


def redacted(value: Any, name: str = "") -> Any:
    """A config dump with credential-like values replaced by ***: fields named like a key, secret,
    token or password, and the parts of any string `redact_text` removes. ctray keeps credentials
    out of configs (environment variables, instance roles), but a config can still carry one."""
    if isinstance(value, dict):
        return {k: redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v, name) for v in value]
    if value is not None and _secret_name(name):
        return REDACTED
    return redact_text(value) if isinstance(value, str) else value


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


def _mlflow_client(uri: str) -> Any:
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

    client = _mlflow_client(uri)
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
    config, store their ids in the run folder. Returns what rank 0's `Tracker` needs ({} when
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
            _mlflow_client(uri).log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
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
        _mlflow_client(ids["mlflow"]["tracking_uri"]).set_terminated(ids["mlflow"]["run_id"], status)
    except Exception as e:  # the run is over either way: its status is a courtesy
        log.warning("mlflow: could not mark run %s %s: %s", ids["mlflow"]["run_id"], status, first_line(e))


class Tracker:
    """Rank 0's side: each report's metrics, evaluation folders and the export. A tracking server that
    fails is warned about and skipped: it never stops training (metrics.jsonl has everything)."""

    def __init__(self, cfg: PretrainConfig, run: RunFolder, ids: dict[str, Any]):
        self.run = run
        self.backends: list[Any] = []
        openers: dict[str, Callable[[], Any]] = {
            "mlflow": lambda: _MlflowLogger(ids["mlflow"]),
            "wandb": lambda: _WandbLogger(cfg, run, ids["wandb"]),
        }
        for name, opener in openers.items():
            if name in ids:
                try:
                    self.backends.append(opener())
                except Exception as e:
                    log.warning("%s: not logging from this worker: %s: %s", name, type(e).__name__, first_line(e))

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for backend in self.backends:
            try:
                call(backend)
            except Exception as e:
                log.warning("%s: %s failed: %s: %s", backend.name, what, type(e).__name__, first_line(e))

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        values = scalars(metrics)
        stamp = float(metrics.get("time", time.time()))
        self._each("logging metrics", lambda b: b.log_metrics(step, values, stamp))

    def log_folder(self, name: str, step: int) -> None:
        """A folder of the run (eval/step_N, export) as artifacts under the same name."""
        if not self.backends:
            return
        if not self.run.exists(name):
            return
        with local_folder(self.run.uri_of(name), self.run.storage) as local:
            self._each(f"logging {name}", lambda b: b.log_folder(local, name, step))

    def close(self, ok: bool = True) -> None:
        """Flush and close; `ok` False: the attempt failed (W&B marks its run failed, not finished)."""
        self._each("closing", lambda b: b.close(ok))


class _MlflowLogger:
    name = "mlflow"

    def __init__(self, ids: dict[str, Any]):
        self.client, self.run_id = _mlflow_client(ids["tracking_uri"]), ids["run_id"]
        self.pending: list[Any] = []

    def log_metrics(self, step: int, values: dict[str, float], stamp: float) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, int(stamp * 1000), step) for k, v in values.items()]
        # Queued: a slow or unreachable server must not stall the training step (waited for at close).
        self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def log_folder(self, local: str, name: str, step: int) -> None:
        self.client.log_artifacts(self.run_id, local, name)

    def close(self, ok: bool) -> None:
        for operations in self.pending:
            operations.wait()


class _WandbLogger:
    name = "wandb"

    def __init__(self, cfg: PretrainConfig, run: RunFolder, ids: dict[str, Any]):
        import wandb

        self.wandb, self.folder, self.mode = wandb, run, ids["mode"]
        # On object storage W&B writes to this node's disk; an offline run's files go to <run>/wandb at close.
        self.temp = ids["dir"] is None
        directory = tempfile.mkdtemp(prefix="ctray-wandb-") if self.temp else ids["dir"]
        os.makedirs(directory, exist_ok=True)
        self.prefix = re.sub(r"[^\w.-]", "-", cfg.run.name)
        self.run = wandb.init(
            project=cfg.run.wandb.project,
            id=ids["id"],
            name=cfg.run.name,
            group=cfg.run.group,
            config=ids["config"],
            mode=self.mode,
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
        self.sync_dir = os.path.dirname(self.run.dir)
        # The step as W&B's x-axis: a resumed run logs steps again from its checkpoint, which W&B's own
        # monotonic step would drop.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_metrics(self, step: int, values: dict[str, float], stamp: float) -> None:
        self.run.log({**values, "step": step})

    def log_folder(self, local: str, name: str, step: int) -> None:
        top = name.split("/")[0]
        artifact = self.wandb.Artifact(f"{self.prefix}-{top}", type="model" if top == "export" else top)
        artifact.add_dir(local)
        self.run.log_artifact(artifact, aliases=[f"step_{step}"])
        images = {f"{top}/{p.stem}": self.wandb.Image(str(p)) for p in sorted(Path(local).glob("*.png"))}
        if images and top != "export":
            self.run.log({**images, "step": step})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
        if self.temp and self.mode == "offline":
            for path in Path(self.sync_dir).rglob("*"):
                if path.is_file():
                    rel = path.relative_to(os.path.dirname(self.sync_dir)).as_posix()
                    self.folder.write(f"wandb/{rel}", path.read_bytes())
            log.info("wandb: offline run in %s (upload: wandb sync)", self.folder.uri_of("wandb"))
        if self.temp:
            shutil.rmtree(os.path.dirname(os.path.dirname(self.sync_dir)), ignore_errors=True)


def start_sweep(cfg: SweepConfig, base: PretrainConfig, folder: RunFolder) -> str | None:
    """The sweep's own MLflow run, the parent its trials nest under (None without mlflow in the base's
    run.loggers); a re-run sweep reopens it from <sweep>/tracking.json. W&B groups the trials by
    the sweep's name instead (run.group)."""
    if "mlflow" not in base.run.loggers:
        return None
    _require("mlflow", "mlflow")
    uri = mlflow_uri(base)
    settings = redacted(
        cfg.model_dump(mode="json", include={"base", "overrides", "space", "search", "num_samples", "scheduler"})
    )
    try:
        run_id = _open_mlflow_run(
            uri,
            _read_ids(folder).get("mlflow"),
            base.run.mlflow.experiment,
            cfg.name,
            {"ctray.sweep": cfg.name},
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
        client = _mlflow_client(uri)
        with tempfile.TemporaryDirectory(prefix="ctray-sweep-") as tmp:
            for name in files:
                Path(tmp, name).write_bytes(folder.read(name))
            client.log_artifacts(run_id, tmp)
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in best.items() if math.isfinite(v)])
        client.set_terminated(run_id, "FINISHED")
    except Exception as e:  # the sweep's own outputs are written already
        log.warning("mlflow: could not log the sweep's results to run %s: %s", run_id, first_line(e))


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)
