"""What must hold before DeepSpeed's engine starts (ctray.train.engine): no op build waits on a
lock a killed build left behind."""

import os
import time

import pytest

from ctray.errors import ConfigError
from ctray.train.engine import STALE_LOCK_S, check_build_locks


def _lock(root, folder: str, age_s: float):
    lock = root / folder / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


@pytest.mark.parametrize("layout", ["deepspeed_shm_comm", "py311_cpu/deepspeed_shm_comm"])
def test_a_stale_lock_of_a_deepspeed_op_is_one_line_naming_it(tmp_path, layout):
    """$TORCH_EXTENSIONS_DIR/<op>/lock, or ~/.cache/torch_extensions/<python>_<device>/<op>/lock."""
    lock = _lock(tmp_path, layout, STALE_LOCK_S + 60)
    with pytest.raises(ConfigError) as failed:
        check_build_locks(tmp_path)
    message = str(failed.value)
    assert message.startswith(f"stale build lock {lock} (11 min old)") and f"delete {lock}" in message
    assert "\n" not in message


def test_a_live_build_and_other_extensions_are_left_alone(tmp_path):
    _lock(tmp_path, "py311_cpu/cpu_adam", 30)  # a build in progress: DeepSpeed waits for it, as it should
    _lock(tmp_path, "py311_cpu/someone_elses_op", STALE_LOCK_S * 10)  # not an op DeepSpeed builds
    check_build_locks(tmp_path)
    check_build_locks(tmp_path / "missing")  # no extensions folder yet
