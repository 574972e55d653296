"""One seed, one run: every random draw (scan order, sampling, augmentation, DeepSpeed steps)
derives from train.seed, the pass and the step, so two runs with the same seed log the same
losses, and a run whose worker is SIGKILLed and resumed from its checkpoint logs the losses of the
uninterrupted run (same data in the same order, same augmentations).

The uninterrupted run has every logger on (TensorBoard, MLflow on a real tracking server, W&B
offline): what they received is checked here too, on the run the module makes anyway."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ctray.train.trainer import run_pretrain

from helpers import (
    CANARY_ENV,
    CANARY_PASSWORD,
    CANARY_USER,
    pretrain_cfg,
    read_metrics,
    tracking_overrides,
    wandb_records,
)

# Two micro-steps per optimizer step: the accumulation boundary, and the seeds of each micro-step.
STEPS = [
    "train.max_steps=10",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "optim.warmup_steps=2",
    "optim.grad_accum=2",
]


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(m["step"], m["loss"], m["epoch"]) for m in read_metrics(run_dir, "steps")]


@pytest.fixture(scope="module")
def runs(train_shards, mlflow_server, tmp_path_factory):
    """The straight run (tracked; CT-FM reads no eval.shards, so a canary secret sits there) and
    the same run with rank 1 SIGKILLed at step 7."""
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as env:  # the driver's environment, as the run's secret is in a real run
        env.setenv("CTRAY_TEST_TOKEN", CANARY_ENV)
        tracked = pretrain_cfg(
            train_shards,
            runs,
            "straight",
            *STEPS,
            *tracking_overrides(mlflow_server, "straight"),
            f"eval.shards={runs}/no-eval-${{CTRAY_TEST_TOKEN}}",
        )
        straight = run_pretrain(tracked)
    killed = run_pretrain(
        pretrain_cfg(train_shards, runs, "killed", *STEPS, "debug.kill_at_step=7", "run.max_failures=1")
    )
    return runs, straight, killed


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_same_seed_same_losses_and_a_killed_run_resumes_the_same_trajectory(runs, train_shards):
    runs, _, killed = runs
    assert killed.step == 10 and (runs / "killed" / "_fault_injected_step7").exists()
    straight, resumed = losses(runs / "straight"), losses(runs / "killed")
    # Re-running a finished run trains nothing and hands back its result.
    again = run_pretrain(pretrain_cfg(train_shards, runs, "straight", *STEPS))
    assert again.step == 10 and again.loss == straight[-1][1] and losses(runs / "straight") == straight
    assert [s for s, _, _ in straight] == list(range(1, 11)) == [s for s, _, _ in resumed]
    # Steps 6-10 of the killed run were redone from the step-5 checkpoint (the 2 steps after it were
    # lost: less than one checkpoint interval) by a new attempt whose data stream starts at that
    # checkpoint's place in the scan order, with the weights exactly as saved.
    log = read_metrics(runs / "killed")
    resumes = read_metrics(runs / "killed", "resume")
    saved = {m["step"]: m["param_checksum"] for m in log if "param_checksum" in m}
    assert [r["step"] for r in resumes] == [5] and resumes[0]["param_checksum"] == pytest.approx(saved[5], rel=1e-12)
    export = load_file(str(runs / "killed" / "export" / "encoder" / "model.safetensors"))  # MONAI SegResEncoder keys
    assert export and all(t.dtype.is_floating_point for t in export.values())
    assert [loss for _, loss, _ in resumed] == pytest.approx([loss for _, loss, _ in straight], rel=1e-6, abs=1e-7)
    assert [e for _, _, e in resumed] == [e for _, _, e in straight] and straight[-1][2] > 1  # epochs continue
    # Each report's TFLOP/s: its views/s (both workers') x the FLOPs per view the workers counted once,
    # per worker; on CPU no MFU (no peak to divide by) and no GPU memory.
    (workers, *_) = read_metrics(runs / "straight", "workers")
    assert workers["gflop_per_view"] > 0
    for m in read_metrics(runs / "straight", "steps"):
        assert m["tflops_per_worker"] == pytest.approx(m["views_per_s"] * workers["gflop_per_view"] / 2 / 1e3)
        assert m["mfu"] is None and m["peak_memory_gib"] is None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_tracked_run_reached_mlflow_and_wandb_without_its_secrets(runs, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    runs, result, _ = runs
    assert result.step == 10
    run_dir = runs / "straight"
    losses = {m["step"]: m["loss"] for m in read_metrics(run_dir, "steps")}
    assert sorted(losses) == list(range(1, 11))

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("exp-straight")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, whatever the workers did
    run_id = run.info.run_id
    assert json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"] == run_id
    assert run.info.run_name == "straight" and run.info.status == "FINISHED"
    # Metrics at the loop's steps, each once (rank 0 only), equal to metrics.jsonl.
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    assert {"lr", "views_per_s", "data_wait_fraction", "epoch", "tflops_per_worker"} <= set(run.data.metrics)
    assert "mfu" not in run.data.metrics  # None on CPU: not a metric
    # The config as dotted params and config.yaml; the export as artifacts.
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["train.max_steps"] == "10"
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
    assert config["optim"]["lr"] == 0.002 and config["eval"]["shards"].endswith("/no-eval-***")
    assert any(r.HasField("artifact") for r in records)  # the export
