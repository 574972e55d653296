"""What ctray.console keeps off the console (unless `ctray -v`): the lines, taken from a quickstart's
output, in which Ray, Ray Data, torch, DeepSpeed and transformers report their own workings; and
what it keeps on: ctray's lines, failures, and warnings about the user's setup."""

import logging
import os
import re
import warnings

import pytest

from ctray.console import DRIVER_LINES, quiet_driver, quiet_worker

HIDDEN_WORKER_LINES = [
    "[2026-12-05 22:54:06,892 E 6702 6790] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'7335134bdee9df586e2aa4be01000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail.",
    "✔️  Dataset dataset_0359euj3pC0NNX61gPErfY_0 execution finished in 4.20 seconds",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "DeepSpeed deepspeed_shm_comm_op built successfully",
    "Loading weights:   0%|          | 0/32 [00:00<?, ?it/s]Loading weights: 100%|██████████| 32/32 [00:00<00:00]",
    "Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]Writing model shards: 100%|██████████| 1/1",
]
SHOWN_WORKER_LINES = [
    "step 2/12  loss 1.7787  lr 2.0e-03  30.8 views/s  data-wait 56.8%  eta 0:00:05",
    "2 worker(s) on 1 node(s)",
    "totalfm_clip: vision encoder loaded from stage 1 (runs/totalfm-mae-local/export/vision)",
    "⚠️  Dataset dataset_0359euj3pC0NNX61gPErfY_0 execution failed",
    "Traceback (most recent call last):",
    "RuntimeError: worker 1 got no full batch of 1 scans from the shards",
    "[2026-12-05 22:54:06,892 E 6702 6790] core_worker.cc:1234: Actor with class name: 'Trainer' and ID: 'ab' died",
    "Loading weights: the checkpoint has unexpected keys",
]


def test_the_driver_leaves_out_ray_lines_but_not_ctrays_or_failures(monkeypatch):
    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    quiet_driver()
    skip = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert [line for line in HIDDEN_WORKER_LINES if not skip.search(line)] == []
    assert [line for line in SHOWN_WORKER_LINES if skip.search(line)] == []
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"

    def shown(logger: str, message: str, level: int = logging.INFO) -> bool:
        record = logging.LogRecord(logger, level, __file__, 1, message, None, None)
        return logging.getLogger(logger).filter(record)

    worker, auth = "ray._private.worker", "ray._private.authentication.authentication_token_setup"
    assert not shown(worker, "Started a local Ray instance. View the dashboard at http://127.0.0.1:8265")
    assert shown(worker, "Started a local Ray instance.", logging.ERROR)  # never a failure
    assert not shown(auth, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
    assert shown(auth, "Token authentication is disabled for this Ray cluster. Anyone with network access", 30)
    finished = "ray.data._internal.execution.streaming_executor"
    assert not shown(finished, "✔️  Dataset dataset_1 execution finished in 0.64 seconds")
    assert shown(finished, "⚠️  Dataset dataset_1 execution failed", logging.WARNING)
    assert shown("ray.data._internal.progress", "Progress bars for operators disabled. To enable, ...")


def test_the_driver_keeps_the_users_own_skip_regex_and_adds_its_filters_once(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS_SKIP_REGEX", "my noise")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    quiet_driver()
    quiet_driver()
    skip = os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"]
    assert skip.startswith("my noise|") and skip.count("PreemptionWatcher") == 1
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    for name in DRIVER_LINES:
        assert len(logging.getLogger(name).filters) == 1


@pytest.mark.filterwarnings("default")
def test_a_worker_leaves_out_torchs_collective_deprecations_only():
    with warnings.catch_warnings(record=True) as seen:  # the filters quiet_worker adds end with the block
        warnings.simplefilter("always")
        quiet_worker()
        for message in (
            "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `all_gather_single`",
            "torch.distributed.nn.functional.all_gather is deprecated, use torch.distributed._functional_collectives",
        ):
            warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning, stacklevel=1)
        warnings.warn("some_option is deprecated: set another_option in your config", FutureWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in seen] == [
        (UserWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
        (FutureWarning, "some_option is deprecated: set another_option in your config"),
    ]
