"""`ctray pretrain` with real parts: Ray Data from shards (local and on the moto S3 server),
Ray Train V2 with 2 workers, a DeepSpeed engine per worker on CPU with gloo."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch

from ctray.config import StorageConfig
from ctray.errors import ConfigError, TrainingFailed
from ctray.export import load_encoder
from ctray.train.trainer import run_pretrain

from helpers import pretrain_cfg, read_metrics


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_loss_falls_training_from_s3_shards(train_shards, s3_endpoint, tmp_path):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("ct-train")
    fs.put(str(train_shards) + "/", "ct-train/shards/", recursive=True)
    result = run_pretrain(
        pretrain_cfg(
            "s3://ct-train/shards",
            "s3://ct-train/runs",
            "falls",
            f"storage.endpoint_url={s3_endpoint}",
            "train.max_steps=36",
            "train.log_every=4",
            "train.checkpoint_every=36",
            "deepspeed.zero_stage=1",
            "objective.patches_per_scan=8",  # 16 views per scan: a less noisy loss than 4 patches
        )
    )
    assert result.step == 36 and result.checkpoint.startswith("s3://ct-train/runs/falls/checkpoint_")
    log = read_metrics("s3://ct-train/runs/falls", endpoint_url=s3_endpoint)
    losses = [m["loss"] for m in log if "loss" in m]
    assert len(losses) == 9
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # Deterministic (seed 0): log(2M - 1) = 2.71 at chance; with CT-FM's released crops (one scale
    # per view on every axis: harder views than a volume fraction) this run falls ~0.09 in 36 steps.
    assert last < first - 0.05 and np.polyfit(range(len(losses)), losses, 1)[0] < 0, losses
    assert all(0 <= m["data_wait_fraction"] <= 1 and m["views_per_s"] > 0 for m in log if "loss" in m)
    fs.invalidate_cache()
    assert fs.exists("ct-train/runs/falls/export/encoder/model.safetensors")
    assert fs.find("ct-train/runs/falls/tensorboard")
    meta = json.loads(fs.cat_file("ct-train/runs/falls/export/export.json"))
    assert meta["parts"]["encoder"]["kwargs"]["init_filters"] == 4 and meta["step"] == 36
    # The export loads from the object store (copied down) and embeds without ctray's trainer.
    encoder = load_encoder(result.export, StorageConfig(endpoint_url=s3_endpoint))
    patches = torch.randint(-1024, 2048, (2, 3, 8, 32, 32), dtype=torch.int16)
    assert encoder.step == 36 and encoder.embed({"patches": patches})["embedding"].shape == (2, 16)

    # A spot cluster back with one GPU instead of two: the run goes on from the 2-rank ZeRO-1
    # checkpoint on 1 worker (DeepSpeed's universal checkpoint), with the weights as saved.
    longer = run_pretrain(
        pretrain_cfg(
            "s3://ct-train/shards", "s3://ct-train/runs", "falls", f"storage.endpoint_url={s3_endpoint}",
            "train.max_steps=40", "train.log_every=4", "train.checkpoint_every=36", "deepspeed.zero_stage=1",
            "objective.patches_per_scan=8", "scaling.num_workers=1",
        )
    )  # fmt: skip
    log = read_metrics("s3://ct-train/runs/falls", endpoint_url=s3_endpoint)
    (resume,) = [m for m in log if m.get("event") == "resume"]
    saved = [m["param_checksum"] for m in log if m.get("step") == 36 and "param_checksum" in m]
    assert resume["step"] == 36 and resume["param_checksum"] == pytest.approx(saved[0], rel=1e-12)
    assert [len(m["nodes"]) for m in log if m.get("event") == "workers"] == [2, 1]
    after = [m for m in log if "loss" in m and m["step"] > 36]
    assert longer.step == 40 and [m["step"] for m in after] == [40]
    # the same Adam moments and weights: the loss stays where training had brought it
    assert after[0]["loss"] < first, (after, losses)


SYNTHETIC = ["data.synthetic=true", "scaling.num_workers=1", "data.scans_per_batch=1"]
"""What is tested happens on the driver: one worker and no data are enough."""


@pytest.mark.timeout(150)
def test_a_stale_op_build_lock_fails_the_run_in_one_line_without_a_restart(ray_local, tmp_path, caplog):
    """A lock left in a DeepSpeed op's build folder by a killed build (torch's FileBaton would wait
    on it forever) stops the run at the workers' engine start with the one line naming it, and the
    run is not restarted: a restart would meet the same file."""
    lock = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    try:
        with pytest.raises(ConfigError) as failed:
            run_pretrain(pretrain_cfg("unused", tmp_path, "locked", *SYNTHETIC, "train.max_steps=2"))
    finally:
        shutil.rmtree(lock.parent)
    message = str(failed.value)
    assert message.startswith(f"stale build lock {lock} (60 min old)") and f"delete {lock}" in message
    assert "\n" not in message and "restarting" not in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_failure_that_repeats_stops_after_one_restart_with_its_line(ray_local, tmp_path, caplog):
    """The worker raises at step 2 in every attempt: the first failure restarts from the step-1
    checkpoint, the second (the same exception, no new checkpoint) stops the run with one line."""
    faulty = [*SYNTHETIC, "train.max_steps=4", "train.checkpoint_every=1", "debug.raise_at_step=2"]
    with pytest.raises(TrainingFailed) as failed:
        run_pretrain(pretrain_cfg("unused", tmp_path, "repeats", *faulty, "run.max_failures=5"))
    assert str(failed.value) == (
        "pretrain repeats: RuntimeError: injected failure at step 2 (debug.raise_at_step), again after restarting "
        "from step 1; not restarting a failure that repeats"
    )
    assert caplog.text.count("restarting from the last checkpoint") == 1
