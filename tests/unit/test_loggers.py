"""The worker loop's parts that need no Ray: the cadence, the metrics window and the loggers."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest
import torch

from ctray.config import StorageConfig
from ctray.run_folder import RunFolder
from ctray.train.config import TrainConfig
from ctray.train.loggers import JsonlLogger, MetricLoggers, TensorBoardLogger
from ctray.train.metrics import Cadence, MetricsWindow


def test_cadence_decides_log_eval_and_checkpoint_independently():
    cadence = Cadence(TrainConfig(max_steps=12, log_every=2, checkpoint_every=5), eval_every=3)
    steps = range(1, 13)
    assert [s for s in steps if cadence.logs(s)] == [2, 4, 6, 8, 10, 12]
    assert [s for s in steps if cadence.evaluates(s)] == [3, 6, 9, 12]
    assert [s for s in steps if cadence.checkpoints(s)] == [5, 10, 12]
    assert [s for s in steps if cadence.reports(s)] == [2, 3, 4, 5, 6, 8, 9, 10, 12]
    never = Cadence(TrainConfig(max_steps=12, log_every=2, checkpoint_every=5), eval_every=-1)
    assert not any(never.evaluates(s) for s in steps)
    at_end = Cadence(TrainConfig(max_steps=7, log_every=100, checkpoint_every=100), eval_every=0)
    assert [s for s in range(1, 8) if at_end.reports(s)] == [7]


def test_metrics_window_counts_training_time_only_and_starts_afresh():
    window = MetricsWindow()
    for loss in (1.0, 3.0):
        window.add({"loss": torch.tensor(loss), "views": torch.tensor(8.0)}, wait_s=0.5, step_s=2.0)
    out = window.report(torch.device("cpu"))
    # 16 views over 4 s of micro-steps (however long the reports between them took); 1 s of it waiting;
    # no FLOPs counted and no GPU: no TFLOP/s, MFU or memory
    assert out == {
        "loss": 2.0,
        "views_per_s": 4.0,
        "data_wait_fraction": 0.25,
        "tflops_per_worker": None,
        "mfu": None,
        "peak_memory_gib": None,
    }
    window.add({"loss": torch.tensor(5.0), "views": torch.tensor(1.0)}, wait_s=0.0, step_s=1.0)
    assert window.report(torch.device("cpu"))["loss"] == 5.0


def test_jsonl_resumes_at_the_checkpoint_and_publishes_on_sync(tmp_path):
    run = RunFolder(str(tmp_path / "run"), StorageConfig())
    run.write("metrics.jsonl", "".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (2, 4, 6)).encode())
    jsonl = JsonlLogger(run, start_step=4)  # step 6 was logged after the checkpoint the run resumes from
    jsonl.log(6, {"step": 6, "loss": 0.5})
    jsonl.event(6, {"event": "resume"})
    assert [json.loads(line)["step"] for line in run.read("metrics.jsonl").decode().splitlines()] == [2, 4, 6]
    jsonl.sync()
    lines = [json.loads(line) for line in run.read("metrics.jsonl").decode().splitlines()]
    assert [(m["step"], m.get("loss"), m.get("event")) for m in lines] == [
        (2, 2, None),
        (4, 4, None),
        (6, 0.5, None),
        (6, None, "resume"),
    ]


class Broken:
    """A backend whose every call fails."""

    def __init__(self, name: str, best_effort: bool):
        self.name, self.best_effort = name, best_effort

    def __getattr__(self, method: str) -> Any:
        def fail(*args: Any) -> None:
            raise ConnectionError(f"{self.name} is down")

        return fail


class Recording:
    name, best_effort = "recording", False

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.calls.append(("log", step))

    def event(self, step: int, fields: dict[str, Any]) -> None:
        self.calls.append(("event", fields["event"]))

    def log_folder(self, local: str, name: str, step: int) -> None:
        self.calls.append(("folder", sorted(os.listdir(local))))

    def sync(self) -> None:
        self.calls.append(("sync", None))

    def close(self, ok: bool) -> None:
        self.calls.append(("close", ok))


def test_a_tracking_server_that_fails_is_skipped_the_run_files_are_not(tmp_path, caplog):
    run = RunFolder(str(tmp_path / "run"), StorageConfig())
    run.write("eval/step_00000004/zero_shot.md", b"|")
    recording = Recording()
    loggers = MetricLoggers([Broken("mlflow", best_effort=True), recording], run)
    with caplog.at_level(logging.WARNING, logger="ctray.train.loggers"):
        loggers.log(4, {"step": 4, "loss": 1.0})
        loggers.event(4, event="workers")
        loggers.log_folder("eval/step_00000004", 4)
        loggers.log_folder("eval/missing", 4)  # nothing to log, nobody called
        loggers.sync()
        loggers.close(ok=False)
    assert recording.calls == [
        ("log", 4),
        ("event", "workers"),
        ("folder", ["zero_shot.md"]),
        ("sync", None),
        ("close", False),
    ]
    assert caplog.text.count("mlflow is down") == 5
    with pytest.raises(ConnectionError, match="jsonl is down"):
        MetricLoggers([Broken("jsonl", best_effort=False)], run).log(4, {"step": 4})


def test_tensorboard_events_reach_the_run_folder_and_the_temp_folder_goes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunFolder(str(tmp_path / "run"), StorageConfig())
    tb = TensorBoardLogger(run)
    tb.log(3, {"step": 3, "time": 1.0, "loss": 0.25, "note": "text is not a scalar"})
    tb.close(ok=True)
    assert not os.path.exists(tb.local)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert events.Tags()["scalars"] == ["loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 0.25)]
