"""One interface for everything a run logs, as torchtitan's logger container: each backend is a
`MetricLogger`, and rank 0 holds them in one `MetricLoggers` (the other ranks hold an empty one).

- `JsonlLogger`: <run>/metrics.jsonl, every report and event, published at each checkpoint and at
  the end. A resumed run keeps its lines up to the checkpoint (later ones were lost with the crash).
- `TensorBoardLogger`: event files under <run>/tensorboard (run.loggers has tensorboard).
- `ConsoleLogger`: the step line with the time left.
- `MlflowLogger`, `WandbLogger`: the runs the driver opened (ctray.train.tracking.start), each
  report's scalars at its step, evaluation folders and the export as artifacts.

The run's own files (JSONL, TensorBoard) must be written: their failures stop the run. A tracking
server that fails is warned about and skipped (`best_effort`): it never stops training, and
metrics.jsonl has everything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ctray.errors import first_line
from ctray.run_folder import RunFolder
from ctray.storage import local_folder
from ctray.train.metrics import StepClock, step_line
from ctray.train.tracking import keep_wandb_offline, mlflow_client, open_wandb, scalars, wandb_safe

if TYPE_CHECKING:
    from ctray.train.config import PretrainConfig

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    """A sink for a run's reports. Every method is called on rank 0 only, in step order."""

    name: str
    best_effort: bool
    """True: a failure is warned about and the run goes on (a remote tracking server)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One report: "step", "time" and the scalars."""
        ...

    def event(self, step: int, fields: dict[str, Any]) -> None:
        """A record that is not a metric (where the workers run, what was resumed)."""
        ...

    def log_folder(self, local: str, name: str, step: int) -> None:
        """A folder of the run (eval/step_N, export), copied to `local`, as artifacts under `name`."""
        ...

    def sync(self) -> None:
        """Make what was logged durable in the run's storage (before each checkpoint is reported)."""
        ...

    def close(self, ok: bool) -> None:
        """Flush and release; `ok` False: the attempt failed."""
        ...


class MetricLoggers:
    """Every backend of a run behind one call each (torchtitan's LoggerContainer)."""

    def __init__(self, backends: list[MetricLogger], run: RunFolder | None = None):
        self.backends, self.run = backends, run

    def _each(self, what: str, call: Callable[[MetricLogger], None]) -> None:
        for backend in self.backends:
            if not backend.best_effort:
                call(backend)
                continue
            try:
                call(backend)
            except Exception as e:
                log.warning("%s: %s failed: %s: %s", backend.name, what, type(e).__name__, first_line(e))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._each("logging metrics", lambda b: b.log(step, metrics))

    def event(self, step: int, **fields: Any) -> None:
        self._each("logging an event", lambda b: b.event(step, fields))

    def log_folder(self, name: str, step: int) -> None:
        """<run>/name as artifacts (copied to this node once for every backend)."""
        if self.run is None or not self.backends or not self.run.exists(name):
            return
        with local_folder(self.run.uri_of(name), self.run.storage) as local:
            self._each(f"logging {name}", lambda b: b.log_folder(local, name, step))

    def sync(self) -> None:
        self._each("syncing", lambda b: b.sync())

    def close(self, ok: bool) -> None:
        self._each("closing", lambda b: b.close(ok))


class _Sink:
    """No-op defaults: a backend implements what it records."""

    best_effort = False

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def event(self, step: int, fields: dict[str, Any]) -> None:
        pass

    def log_folder(self, local: str, name: str, step: int) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class JsonlLogger(_Sink):
    """<run>/metrics.jsonl: one JSON line per report or event, rewritten whole at each sync."""

    name = "jsonl"
    FILE = "metrics.jsonl"

    def __init__(self, run: RunFolder, start_step: int):
        self.run = run
        old = [json.loads(line) for line in run.read(self.FILE).decode().splitlines()] if run.exists(self.FILE) else []
        self.lines: list[dict[str, Any]] = [m for m in old if m["step"] <= start_step]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.lines.append(metrics)

    def event(self, step: int, fields: dict[str, Any]) -> None:
        self.lines.append({"step": step, "time": time.time(), **fields})

    def sync(self) -> None:
        self.run.write(self.FILE, "".join(json.dumps(m) + "\n" for m in self.lines).encode())

    def close(self, ok: bool) -> None:
        self.sync()


class TensorBoardLogger(_Sink):
    """TensorBoard event files, written on this node and copied to <run>/tensorboard at each sync."""

    name = "tensorboard"

    def __init__(self, run: RunFolder):
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.local = tempfile.mkdtemp(prefix="ctray-tensorboard-")
        self.writer = SummaryWriter(self.local)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step)

    def sync(self) -> None:
        self.writer.flush()
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                self.run.write(f"tensorboard/{name}", f.read())

    def close(self, ok: bool) -> None:
        try:
            self.sync()
        finally:
            self.writer.close()
            shutil.rmtree(self.local, ignore_errors=True)


class ConsoleLogger(_Sink):
    """The console's step line per report, with the time left at the recent step rate."""

    name = "console"

    def __init__(self, total_steps: int, start_step: int, clock: StepClock | None = None):
        self.total = total_steps
        self.clock = clock or StepClock()
        self.clock.mark(start_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if "loss" in metrics:
            log.info("%s", step_line(step, self.total, metrics, self.clock.eta_s(step, self.total)))


class MlflowLogger(_Sink):
    """Each report's scalars queued to the run's MLflow run (driver-opened: tracking.start), folders as artifacts."""

    name = "mlflow"
    best_effort = True

    def __init__(self, ids: dict[str, Any]):
        self.client, self.run_id = mlflow_client(ids["tracking_uri"]), ids["run_id"]
        self.pending: list[Any] = []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(float(metrics.get("time", time.time())) * 1000)
        values = [Metric(k, v, stamp, step) for k, v in scalars(metrics).items()]
        # Queued: a slow or unreachable server must not stall the training step (waited for at close).
        self.pending.append(self.client.log_batch(self.run_id, metrics=values, synchronous=False))

    def log_folder(self, local: str, name: str, step: int) -> None:
        self.client.log_artifacts(self.run_id, local, name)

    def close(self, ok: bool) -> None:
        for operations in self.pending:
            operations.wait()


class WandbLogger(_Sink):
    """The W&B run, opened in this process (a W&B run lives in the process that opened it)."""

    name = "wandb"
    best_effort = True

    def __init__(self, cfg: PretrainConfig, run: RunFolder, ids: dict[str, Any]):
        import wandb

        self.wandb, self.folder, self.mode = wandb, run, ids["mode"]
        # On object storage W&B writes to this node's disk; an offline run's files go to <run>/wandb at close.
        self.temp = ids["dir"] is None
        directory = tempfile.mkdtemp(prefix="ctray-wandb-") if self.temp else ids["dir"]
        self.prefix = wandb_safe(cfg.run.name)
        self.run = open_wandb(cfg, ids["id"], self.mode, directory, ids["config"])
        self.sync_dir = os.path.dirname(self.run.dir)
        # The step as W&B's x-axis: a resumed run logs steps again from its checkpoint, which W&B's own
        # monotonic step would drop.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({**scalars(metrics), "step": step})

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
            keep_wandb_offline(self.folder, self.sync_dir)
        if self.temp:
            shutil.rmtree(os.path.dirname(os.path.dirname(self.sync_dir)), ignore_errors=True)


def open_loggers(cfg: PretrainConfig, run: RunFolder, start_step: int, tracking: dict[str, Any]) -> MetricLoggers:
    """Rank 0's backends: the run's files, the console, and the tracking runs the driver opened
    (`tracking`, from ctray.train.tracking.start). A tracking backend that cannot open is warned
    about and left out."""
    backends: list[MetricLogger] = [JsonlLogger(run, start_step)]
    if "tensorboard" in cfg.run.loggers:
        backends.append(TensorBoardLogger(run))
    backends.append(ConsoleLogger(cfg.train.steps, start_step))
    openers: dict[str, Callable[[], MetricLogger]] = {
        "mlflow": lambda: MlflowLogger(tracking["mlflow"]),
        "wandb": lambda: WandbLogger(cfg, run, tracking["wandb"]),
    }
    for name, opener in openers.items():
        if name in tracking:
            try:
                backends.append(opener())
            except Exception as e:
                log.warning("%s: not logging from this worker: %s: %s", name, type(e).__name__, first_line(e))
    return MetricLoggers(backends, run)
