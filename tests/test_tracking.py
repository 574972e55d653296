"""Experiment tracking against a real MLflow tracking server (`mlflow server` with a SQLite store and
proxied artifacts on 127.0.0.1) and W&B in offline mode, and the console's step line.

The end-to-end test runs a tiny real pretrain (2 DeepSpeed workers on Ray Train, synthetic batches:
tracking does not depend on where the data comes from) and reads back what MLflow received: the
metrics at their steps (once, not once per worker), the redacted config as params and config.yaml,
the export; and the history in W&B's offline run file. The other tests drive the tracking module
directly against the same server: resuming a run, evaluation folders, a sweep's parent run."""

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ctray.config import load_config
from ctray.errors import ConfigError
from ctray.run_folder import RunFolder
from ctray.train import tracking
from ctray.train.config import PretrainConfig
from ctray.train.loop import StepClock, step_line

from conftest import free_port
from test_pretrain import TINY

CANARY_USER, CANARY_PASSWORD = "canaryuser", "canary-password-4821"
CANARY_ENV = "canary-env-token-9137"  # a secret reaching the config through ${VAR}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with a SQLite backend and artifacts proxied to a local folder."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    out = open(root / "server.log", "wb")  # closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its uvicorn worker is a child: stopped with it, as a group
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out.close()


def tracked_cfg(storage, name, uri, *overrides) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        None,
        [
            *TINY,
            "data.synthetic=true",
            f"data.shards={storage}/no-shards-${{CTRAY_TEST_TOKEN:-unset}}",  # not read (synthetic): a canary
            f"storage.endpoint_url=http://{CANARY_USER}:{CANARY_PASSWORD}@127.0.0.1:9",
            f"run.storage={storage}",
            f"run.name={name}",
            "run.loggers=[tensorboard, mlflow, wandb]",
            f"run.mlflow.tracking_uri={uri}",
            f"run.mlflow.experiment=exp-{name}",
            "run.wandb.mode=offline",
            *overrides,
        ],
    )


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: a ':W&B' header, then LevelDB's log format (32 KiB blocks of
    checksum, length, type chunks); W&B's Python reader of it went with its Go core."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


@pytest.mark.slow
def test_pretrain_logs_metrics_config_and_export_to_mlflow_and_wandb(ray_local, mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from ctray.train.trainer import run_pretrain

    monkeypatch.setenv("CTRAY_TEST_TOKEN", CANARY_ENV)
    cfg = tracked_cfg(tmp_path, "tracked", mlflow_server, "train.max_steps=6", "train.log_every=2")
    result = run_pretrain(cfg)
    assert result.step == 6
    run_dir = tmp_path / "tracked"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in logged if "loss" in m}
    assert sorted(losses) == [2, 4, 6]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("exp-tracked")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, whatever the workers did
    run_id = run.info.run_id
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    # Metrics at the loop's steps, each once (rank 0 only), equal to metrics.jsonl.
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [2, 4, 6]
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    assert {"lr", "views_per_s", "data_wait_fraction", "epoch"} <= set(run.data.metrics)
    # The config as dotted params and config.yaml; the export as artifacts.
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["train.max_steps"] == "6"
    assert json.loads(params["run.loggers"]) == ["tensorboard", "mlflow", "wandb"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "export"} <= artifacts
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert exported == {f"export/{p.name}" for p in (run_dir / "export").iterdir()} and exported
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    # Canary: the storage credential and the secret from ${CTRAY_TEST_TOKEN} reached the config, not MLflow.
    shown = "\n".join([config_yaml, *params.values(), *run.data.tags.values()])
    assert CANARY_PASSWORD not in shown and CANARY_USER not in shown and CANARY_ENV not in shown
    assert params["storage.endpoint_url"] == "http://***@127.0.0.1:9"
    assert CANARY_ENV in (run_dir / "config.yaml").read_text()  # the run's own config.yaml keeps it
    assert list((run_dir / "tensorboard").iterdir())  # and TensorBoard, the third logger

    # W&B offline: the run file in the run folder holds the history at the same steps, and the config.
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    rows = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    assert {row["step"]: row["loss"] for row in rows if "loss" in row} == pytest.approx(losses)
    raw = wandb_file.read_bytes()
    assert CANARY_PASSWORD.encode() not in raw and CANARY_ENV.encode() not in raw
    (run_record,) = [r.run for r in records if r.HasField("run")]
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert config["optim"]["lr"] == 0.002 and config["data"]["shards"].endswith("/no-shards-***")
    assert any(r.HasField("artifact") for r in records)  # the export


def test_resume_continues_the_run_and_logs_eval_folders(mlflow_server, tmp_path, monkeypatch, caplog):
    """A re-run (or a restarted attempt) reopens the MLflow run whose id the run folder holds; the
    params keep their first values; evaluation folders and metrics land in that one run."""
    from mlflow import MlflowClient

    monkeypatch.setenv("CTRAY_TEST_TOKEN", CANARY_ENV)
    cfg = tracked_cfg(tmp_path, "resumed", mlflow_server, "run.loggers=[mlflow]")
    run = RunFolder.of(cfg)
    first = tracking.start(cfg, run)
    run_id = first["mlflow"]["run_id"]
    tracking.end(first, "FAILED")  # the first attempt died

    cfg.train.max_steps = 99
    with caplog.at_level(logging.WARNING, logger="ctray.train.tracking"):
        again = tracking.start(cfg, run)
    assert again["mlflow"]["run_id"] == run_id
    assert "train.max_steps" in caplog.text  # kept its first value in MLflow, said so
    eval_dir = run.eval_dir(4)
    run.write(f"{eval_dir}/zero_shot.md", b"| task | auroc |\n")
    run.write(f"{eval_dir}/zero_shot.json", b'{"step": 4}')
    run.write(f"{eval_dir}/text_similarity.png", b"\x89PNG\r\n\x1a\n")
    tracker = tracking.Tracker(cfg, run, again)
    tracker.log_metrics(4, {"step": 4, "time": time.time(), "loss": 1.5, "zs_finding_auroc_mean": 0.75})
    tracker.log_folder(eval_dir, 4)
    tracker.close()
    tracking.end(again, "FINISHED")

    client = MlflowClient(mlflow_server)
    (only,) = client.search_runs([client.get_experiment_by_name("exp-resumed").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    assert only.data.params["train.max_steps"] == "null"  # its first value
    shown = json.dumps([only.data.params, only.data.tags])  # canary: storage credential, ${VAR} secret
    assert CANARY_PASSWORD not in shown and CANARY_ENV not in shown and "http://***@127.0.0.1:9" in shown
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "zs_finding_auroc_mean")] == [(4, 0.75)]
    logged = {a.path for a in client.list_artifacts(run_id, eval_dir)}
    assert logged == {f"{eval_dir}/{n}" for n in ("zero_shot.md", "zero_shot.json", "text_similarity.png")}

    # A run folder whose id is unknown to the server (another server, a deleted run) starts a new run.
    (Path(run.path()) / tracking.IDS_FILE).write_text(
        json.dumps({"mlflow": {"tracking_uri": "http://elsewhere", "run_id": "x"}})
    )
    assert tracking.start(cfg, run)["mlflow"]["run_id"] != run_id


def test_sweep_run_is_reopened_and_gets_the_results(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from ctray.tune.config import SweepConfig

    base = tracked_cfg(tmp_path, "trial", mlflow_server, "run.loggers=[mlflow]")
    sweep = SweepConfig(base="jobs/ctfm-local.yaml", name="lr-sweep", space={"optim.lr": {"grid": [0.1, 0.2]}})
    folder = RunFolder(str(tmp_path / "sweeps" / "lr-sweep"), base.storage)
    parent = tracking.start_sweep(sweep, base, folder)
    assert parent is not None and tracking.start_sweep(sweep, base, folder) == parent
    folder.write("results.csv", b"trial,optim.lr,loss\n")
    folder.write("best.yaml", b"optim: {lr: 0.1}\n")
    tracking.end_sweep(base, parent, folder, ["results.csv", "best.yaml"], {"best_loss": 0.5})
    client = MlflowClient(mlflow_server)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["best_loss"] == 0.5
    assert run.data.params["space.optim.lr.grid"] == "[0.1, 0.2]"
    assert {a.path for a in client.list_artifacts(parent)} == {"results.csv", "best.yaml"}
    # A trial nests under it.
    trial = tracked_cfg(tmp_path, "t1", mlflow_server, "run.loggers=[mlflow]", f"run.mlflow.parent_run_id={parent}")
    ids = tracking.start(trial, RunFolder.of(trial))
    assert client.get_run(ids["mlflow"]["run_id"]).data.tags["mlflow.parentRunId"] == parent


def test_redaction_of_credentials(monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", "tok-1234567890")
    dumped = {
        "storage": {"endpoint_url": "https://AKIAEXAMPLE:s3cr3t@minio.local:9000"},
        "llm": {"api_key": "sk-live-abc", "api_key_env": "OPENAI_API_KEY", "base_url": "http://h/v1?token=abc&x=1"},
        "data": {"shards": "s3://bucket/tok-1234567890/shards"},
        "optim": {"lr": 0.001, "betas": [0.9, 0.999]},
    }
    out = tracking.redacted(dumped)
    assert out["storage"]["endpoint_url"] == "https://***@minio.local:9000"
    assert out["llm"]["api_key"] == "***" and out["llm"]["base_url"] == "http://h/v1?token=***&x=1"
    assert out["data"]["shards"] == "s3://bucket/***/shards"
    assert out["optim"] == {"lr": 0.001, "betas": [0.9, 0.999]}
    assert tracking.flat_params(out)["optim.betas"] == "[0.9, 0.999]"


def test_missing_package_or_server_is_one_clear_line(tmp_path, monkeypatch):
    import importlib.util

    cfg = load_config(PretrainConfig, None, [*TINY, "data.shards=x", f"run.storage={tmp_path}", "run.loggers=[mlflow]"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"no tracking server: set run\.mlflow\.tracking_uri"):
        tracking.start(cfg, RunFolder.of(cfg))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg.run.loggers = ["wandb"]
    with pytest.raises(
        ConfigError, match=r"run.loggers has wandb but wandb is not installed: pip install 'ctray\[tracking\]'"
    ):
        tracking.start(cfg, RunFolder.of(cfg))


def test_step_line_and_eta():
    metrics = {"loss": 1.23451, "lr": 1e-4, "views_per_s": 312.44, "data_wait_fraction": 0.031}
    assert step_line(40, 200, metrics, 252.4) == (
        "step 40/200  loss 1.2345  lr 1.0e-04  312.4 views/s  data-wait 3.1%  eta 0:04:12"
    )
    assert step_line(40, 200, metrics, None).endswith("eta ?")
    times = iter([0.0, 30.0, 40.0, 50.0])  # a slow first report (start-up), then 1 step/s
    clock = StepClock(reports=2, now=lambda: next(times))
    clock.mark(0)
    assert clock.eta_s(10, 100) == 270.0  # 10 steps in 30 s
    assert clock.eta_s(20, 100) == 160.0  # 20 in 40 s
    assert clock.eta_s(30, 100) == 70.0  # the last 2 reports only: 20 steps in 20 s


def test_ray_train_lines_only_with_verbose(tmp_path):
    """Ray Train's INFO lines (a TrainingReport repr per report and worker) are off unless -v."""
    from ctray.train.trainer import _trainer

    cfg = load_config(PretrainConfig, None, [*TINY, "data.synthetic=true", "data.shards=x", f"run.storage={tmp_path}"])
    ctray_log = logging.getLogger("ctray")
    trainer = _trainer(cfg, RunFolder.of(cfg), None, 0, {}, None)
    assert trainer.run_config.logging_config.log_level == "WARNING"
    old = ctray_log.level
    ctray_log.setLevel(logging.DEBUG)  # what `ctray -v` does (root at DEBUG)
    try:
        trainer = _trainer(cfg, RunFolder.of(cfg), None, 0, {}, None)
    finally:
        ctray_log.setLevel(old)
    assert trainer.run_config.logging_config.log_level == "INFO"
