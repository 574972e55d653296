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
        r"its nodes offer: \{\"CPU\": 2.0\}",
    ):
        ensure_schedulable({"CPU": 1.0, "GPU": 8.0}, "training worker")
    assert time.time() - t0 < 5
    ensure_schedulable({"CPU": 2.0}, "training worker")  # fits: returns
