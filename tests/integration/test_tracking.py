"""Experiment tracking against a real MLflow tracking server (`mlflow server` with a SQLite store and
proxied artifacts on 127.0.0.1) and W&B in offline mode, and the console's step line.

A real pretrain with every logger on (what MLflow and W&B receive from it) is checked in
test_reproducible.py, on the run it makes anyway. The tests here drive the tracking module
directly against the same server: resuming a run, evaluation folders, a sweep's parent run."""

import json
import logging
import time
from pathlib import Path

import pytest

from ctray.config import load_config, to_yaml
from ctray.errors import ConfigError
from ctray.redact import redacted
from ctray.run_folder import RunFolder
from ctray.train import tracking
from ctray.train.config import PretrainConfig
from ctray.train.loggers import MetricLoggers, MlflowLogger
from ctray.train.metrics import StepClock, step_line

from helpers import CANARY_ENV, CANARY_PASSWORD, TINY, tracking_overrides, wandb_records


def tracked_cfg(storage, name, uri, *overrides) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        None,
        [
            *TINY,
            "data.synthetic=true",
            f"data.shards={storage}/no-shards-${{CTRAY_TEST_TOKEN:-unset}}",  # not read (synthetic): a canary
            f"run.storage={storage}",
            f"run.name={name}",
            *tracking_overrides(uri, name),
            *overrides,
        ],
    )


def test_resume_continues_the_run_and_logs_eval_folders(mlflow_server, tmp_path, monkeypatch, caplog):
    """A re-run (or a restarted attempt) reopens the MLflow run whose id the run folder holds; the
    params keep their first values; evaluation folders and metrics land in that one run."""
    from mlflow import MlflowClient

    monkeypatch.setenv("CTRAY_TEST_TOKEN", CANARY_ENV)
    cfg = tracked_cfg(tmp_path, "resumed", mlflow_server, "run.loggers=[mlflow]")
    run = cfg.run_folder()
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
    loggers = MetricLoggers([MlflowLogger(again["mlflow"])], run)
    loggers.log(4, {"step": 4, "time": time.time(), "loss": 1.5, "zs_finding_auroc_mean": 0.75})
    loggers.log_folder(eval_dir, 4)
    loggers.close(ok=True)
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
    parent = tracking.start_sweep(sweep.name, sweep.tracked_settings(), base, folder)
    assert parent is not None and tracking.start_sweep(sweep.name, sweep.tracked_settings(), base, folder) == parent
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
    ids = tracking.start(trial, trial.run_folder())
    assert client.get_run(ids["mlflow"]["run_id"]).data.tags["mlflow.parentRunId"] == parent


def test_redaction_of_credentials(monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", "tok-1234567890")
    dumped = {
        "storage": {"endpoint_url": "https://AKIAEXAMPLE:s3cr3t@minio.local:9000"},
        "llm": {"api_key": "sk-live-abc", "api_key_env": "OPENAI_API_KEY", "base_url": "http://h/v1?token=abc&x=1"},
        "data": {"shards": "s3://bucket/tok-1234567890/shards"},
        "optim": {"lr": 0.001, "betas": [0.9, 0.999]},
    }
    out = redacted(dumped)
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
        tracking.start(cfg, cfg.run_folder())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg.run.loggers = ["wandb"]
    with pytest.raises(
        ConfigError, match=r"run.loggers has wandb but wandb is not installed: pip install 'ctray\[tracking\]'"
    ):
        tracking.start(cfg, cfg.run_folder())


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
    trainer = _trainer(cfg, cfg.run_folder(), None, 0, {}, None)
    assert trainer.run_config.logging_config.log_level == "WARNING"
    old = ctray_log.level
    ctray_log.setLevel(logging.DEBUG)  # what `ctray -v` does (root at DEBUG)
    try:
        trainer = _trainer(cfg, cfg.run_folder(), None, 0, {}, None)
    finally:
        ctray_log.setLevel(old)
    assert trainer.run_config.logging_config.log_level == "INFO"


def test_an_evaluation_lands_in_the_training_runs_mlflow_run(mlflow_server, tmp_path):
    """`ctray eval` of a run's export: the report's scalars at the export's step and the report
    folder as artifacts, in the MLflow run the training opened (its tracking.json)."""
    from mlflow import MlflowClient

    cfg = tracked_cfg(tmp_path, "evaluated", mlflow_server, "run.loggers=[mlflow]")
    run = cfg.run_folder()
    ids = tracking.start(cfg, run)
    report = RunFolder(str(tmp_path / "emb" / "report"), cfg.storage)
    report.write("report.md", b"# Evaluation\n")
    report.write("metrics.json", b"{}")
    metrics = {"probe_linear_finding_auroc": 0.7, "zs_finding_auroc_std": float("nan")}
    logged = tracking.log_evaluation(run, 12, metrics, report, "valid")
    assert logged == tracking.EvaluationLogged(mlflow=ids["mlflow"]["run_id"])  # no W&B in its loggers
    run_id = logged.mlflow
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(run_id, "eval/valid/probe_linear_finding_auroc")
    assert [(m.step, m.value) for m in history] == [(12, 0.7)]
    assert "eval/valid/zs_finding_auroc_std" not in client.get_run(run_id).data.metrics  # NaN: not logged
    assert {a.path for a in client.list_artifacts(run_id, "eval/valid")} == {
        "eval/valid/report.md",
        "eval/valid/metrics.json",
    }
    untracked = RunFolder(str(tmp_path / "untracked"), cfg.storage)
    assert tracking.log_evaluation(untracked, 1, metrics, report, "valid") == tracking.EvaluationLogged()


def test_an_evaluation_lands_in_the_training_runs_wandb_run(tmp_path, monkeypatch, caplog, capfd):
    """`ctray eval` of a run tracked in W&B (offline): the W&B run whose id tracking.json holds, the
    report's finite scalars in its summary and in one row on their own x-axis (eval/<name>/step,
    since W&B drops rows below the run's last step), the report folder as an artifact; neither the
    config's secrets nor the report's text in the run file or the console."""
    monkeypatch.setenv("CTRAY_TEST_TOKEN", CANARY_ENV)
    cfg = tracked_cfg(tmp_path, "evaluated-wb", "http://127.0.0.1:9", "run.loggers=[wandb]")
    run = cfg.run_folder()
    run.write("config.yaml", to_yaml(cfg).encode())  # as run_pretrain leaves it: secrets expanded
    ids = tracking.start(cfg, run)
    canary = "report-canary-5521"
    report_text = f"# Evaluation\n{canary}: no lesion in the liver\n"
    report = RunFolder(str(tmp_path / "emb" / "report"), cfg.storage)
    report.write("report.md", report_text.encode())
    report.write("metrics.json", b"{}")
    metrics = {"probe_linear_finding_auroc": 0.7, "zs_finding_auroc_std": float("nan")}
    with caplog.at_level(logging.INFO, logger="ctray.train.tracking"):
        logged = tracking.log_evaluation(run, 12, metrics, report, "valid")
    wandb_id = ids["wandb"]["id"]
    assert logged == tracking.EvaluationLogged(wandb=wandb_id)

    (wandb_file,) = Path(run.path()).glob(f"wandb/offline-run-*/run-{wandb_id}.wandb")  # the same run
    records = wandb_records(wandb_file)
    rows = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    (row,) = [row for row in rows if "eval/valid/probe_linear_finding_auroc" in row]
    assert row["eval/valid/probe_linear_finding_auroc"] == 0.7 and row["eval/valid/step"] == 12
    summary = {
        u.key or "/".join(u.nested_key): json.loads(u.value_json)
        for r in records
        if r.HasField("summary")
        for u in r.summary.update
    }
    assert summary["eval/valid/probe_linear_finding_auroc"] == 0.7
    axes = {m.metric.glob_name: m.metric.step_metric for m in records if m.HasField("metric") and m.metric.glob_name}
    assert axes == {"eval/valid/*": "eval/valid/step"}
    assert all("eval/valid/zs_finding_auroc_std" not in row for row in [*rows, summary])  # NaN: not logged
    (artifact,) = [r.artifact for r in records if r.HasField("artifact")]
    assert (artifact.type, artifact.name) == ("evaluation", "evaluated-wb-eval-valid")
    assert {c.path for c in artifact.manifest.contents} == {"report.md", "metrics.json"}
    assert "step_12" in artifact.aliases
    raw = wandb_file.read_bytes()
    assert CANARY_PASSWORD.encode() not in raw and CANARY_ENV.encode() not in raw  # the config is not re-logged
    shown = caplog.text + "".join(capfd.readouterr())
    assert canary not in shown and canary.encode() not in raw

    # Best effort: a run folder W&B cannot be resumed from (no config.yaml) is one warning line.
    broken = RunFolder(str(tmp_path / "broken"), cfg.storage)
    broken.write(tracking.IDS_FILE, json.dumps({"wandb": {"id": wandb_id}}).encode())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctray.train.tracking"):
        assert tracking.log_evaluation(broken, 12, metrics, report, "valid") == tracking.EvaluationLogged()
    (warning,) = caplog.messages
    assert warning.startswith(f"wandb: could not log the evaluation to run {wandb_id}: ") and "\n" not in warning
