"""What `ctray` prints: ctray's own lines and the warnings a user acts on.

The lines in which Ray, Ray Data, torch, DeepSpeed and transformers report their own workings (an
execution plan per dataset, a deprecation inside a library, a progress bar of a few milliseconds)
go to Ray's log files or nowhere; `ctray -v` shows them all. Each hidden line is listed below with
why hiding it is safe. Nothing that reports a failure, and no warning about the user's data or
config, is hidden: the filters match these lines' own words, not a logger or a level.

One function per kind of process:
- quiet_driver: the `ctray` process, before its command imports Ray (the CLI, unless -v);
- quiet_dataset: a Ray Data dataset's own context, which travels with it to the process that runs
  it (each rank's split coordinator);
- quiet_worker: a Ray Train worker, at its entry (ctray.train.loop.train_loop, unless -v).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray.data

WORKER_LINES: dict[str, str] = {
    r"Actor with class name: '(PreemptionWatcher|MapWorker\(.*\))' and ID: \S+ has constructor arguments in "
    r"the object store and max_restarts > 0": "Ray core's note (ray-project/ray#53727) on actors that Ray Train "
    "(its preemption watcher, at every run's start) and Ray Data (map actors) create with arguments passed by "
    "reference: a property of Ray's own actors, nothing a ctray user changes",
    r"Dataset \S+ execution finished in": "Ray Data's last line of each rank's stream, from its split coordinator; "
    "ctray's step lines and `pretrain done` line say how the run went",
    r"Progress bars disabled\. To enable": "Ray Data's note that ctray turned its progress bars off (quiet_dataset)",
    r"DeepSpeed \S+ built successfully": "DeepSpeed's print in each worker after loading its shared-memory "
    "communication op; a build that fails raises",
    r"(Loading weights|Writing model shards): +\d+%": "transformers' progress bars of loading and saving a "
    "model in a worker (the stage-1 encoder, the export): a fraction of a second each",
}
"""Lines of Ray's worker processes that the driver does not print (regex: why), given to Ray as
RAY_DEDUP_LOGS_SKIP_REGEX, which Ray's log monitor in the driver applies to every forwarded line.
`ctray -v` turns Ray's deduplication off, and with it this filter."""

DRIVER_LINES: dict[str, tuple[str, str]] = {
    "ray._private.authentication.authentication_token_setup": (
        r"^Token authentication is enabled for this Ray cluster",
        "Ray's note that the local Ray it starts uses token authentication, its secure default: nothing to do "
        "(the warning that authentication is disabled still shows)",
    ),
    "ray._private.worker": (
        r"^(Started a local Ray instance|Connected to Ray cluster|Connecting to existing Ray cluster)",
        "ctray's own `ray: ...` line says which Ray the command uses, with its dashboard",
    ),
    "ray.data._internal.execution.streaming_executor": (
        r"Dataset \S+ execution finished in",
        "Ray Data's last line of each dataset the driver runs; ctray reports what the dataset did",
    ),
    "ray.data._internal.progress": (
        r"^Progress bars disabled\. To enable",
        "Ray Data's note that ctray turned its progress bars off (quiet_dataset)",
    ),
}
"""Records of the driver's Ray loggers that are not printed: logger -> (regex, why)."""

WORKER_WARNINGS: dict[str, str] = {
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated": "torch's deprecation of the collective "
    "that DeepSpeed's ZeRO all-gathers call (deepspeed.comm), printed by every worker: DeepSpeed's to move",
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated": "torch's deprecation of the autograd "
    "all-gather of ctray.dist.gather_with_grad (the contrastive losses' batch): the replacement it names is "
    "private (torch.distributed._functional_collectives); ctray keeps the public call until one is public",
}
"""FutureWarnings that Ray Train workers do not print: message regex (matched at its start) -> why."""


class _Hide(logging.Filter):
    """Drops the records whose message matches `pattern`, below ERROR."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not self.pattern.search(record.getMessage())


def verbose() -> bool:
    """`ctray -v` (the ctray logger at DEBUG): every library's lines as the library prints them."""
    return logging.getLogger("ctray").isEnabledFor(logging.DEBUG)


def quiet_driver() -> None:
    """The `ctray` process's console: WORKER_LINES and DRIVER_LINES hidden, and transformers' and the
    Hugging Face hub's progress bars off (HF_HUB_DISABLE_PROGRESS_BARS; a local Ray's workers inherit
    it). Environment variables a user set are kept. Call before Ray is imported: Ray reads its
    variables at import."""
    skip = "|".join(f"(?:{pattern})" for pattern in WORKER_LINES)
    own = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX", "")
    if skip not in own:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{own}|{skip}" if own else skip
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, (pattern, _why) in DRIVER_LINES.items():
        logger = logging.getLogger(name)  # the same object when Ray creates it later
        if not any(isinstance(f, _Hide) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Hide(pattern))


def quiet_dataset(ds: ray.data.Dataset, verbose: bool) -> None:
    """A dataset's own console output: unless `verbose`, no progress bars (redrawn by every rank's
    split coordinator, they would bury the step lines) and no "Starting execution" and "Execution
    plan" lines at each start (the dataset's plan is ctray's, the same every run)."""
    if not verbose:
        ds.context.enable_progress_bars = False
        ds.context.print_on_execution_start = False


def quiet_worker() -> None:
    """A Ray Train worker's console: no WORKER_WARNINGS, and no Ray Train line per report (Ray Train
    logs every report of every rank, "Reporting training result N: TrainingReport(...)", at INFO on
    a logger named after its file, outside `ray.train`, so the run's LoggingConfig misses it;
    ctray's own step line says the same once)."""
    for message in WORKER_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray: its lines show, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
