"""Joining Ray and refusing work no node can run (ctray.runtime), on the session's local Ray (no
autoscaler). The autoscaling cases run on the fake cluster of test_multinode.py."""

import time

import pytest

from ctray.errors import ConfigError
from ctray.runtime import ensure_schedulable


def test_without_an_autoscaler_it_fails_at_once(ray_local):
    t0 = time.time()
    with pytest.raises(
        ConfigError,
        match=r"no node of this Ray cluster can run one training worker \(1 CPU, 8 GPU\); "
        r"its nodes offer: 2 CPU, [0-9.]+ GiB memory$",
    ):
        ensure_schedulable({"CPU": 1.0, "GPU": 8.0}, "training worker", timeout_s=120)
    # memory, which ingest's writers ask for, counts as well
    with pytest.raises(ConfigError, match=r"one ingest shard writer \(1 CPU, 9.313e\+05 GiB memory\)"):
        ensure_schedulable({"CPU": 1.0, "memory": 1e15}, "ingest shard writer", timeout_s=120)
    assert time.time() - t0 < 30  # not the 120 s a wait for an autoscaler would take
    ensure_schedulable({"CPU": 2.0}, "training worker")  # fits: returns
