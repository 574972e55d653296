"""The suite cannot hang: under the project's pytest configuration, a test that waits forever is
stopped by pytest-timeout with its name, and the run goes on with the next test."""

import subprocess
import sys

from helpers import REPO


def test_a_test_that_waits_forever_is_stopped_and_named(tmp_path):
    (tmp_path / "test_forever.py").write_text(
        "import time\n\n\ndef test_waits_forever():\n    time.sleep(3600)\n\n\ndef test_after_it():\n    pass\n"
    )
    done = subprocess.run(
        # The project's own ini (plugins, addopts), with a 3 s limit instead of its 90.
        [
            *(sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path)),
            *("-o", "timeout=3", "-p", "no:cacheprovider", str(tmp_path / "test_forever.py")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-2000:]
    assert (
        "Timeout (>3.0s) from pytest-timeout" in out
        and "FAILED" in out
        and "test_forever.py::test_waits_forever" in out
    ), out
    assert "1 failed, 1 passed" in out
