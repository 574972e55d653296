"""Imported by every Python process of a Ray head started with this folder on its PYTHONPATH
(e2e/test_ingest_cli.py): a Ray worker that loads a NIfTI input whose file name contains
$CTRAY_TEST_KILL_ON is killed with SIGKILL on the spot, as the kernel's OOM killer ends a process
(a real out-of-memory kill cannot be made safely on a shared test machine). The driver and Ray's
own processes load nothing through it and are left as they are."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys
from types import ModuleType
from typing import Any

_MARKER = os.environ.get("CTRAY_TEST_KILL_ON", "")
_TARGET = "ctray.ingest.volume"


def _in_ray_worker() -> bool:
    return os.path.basename(sys.argv[0]) == "default_worker.py"


def _kill_on_load(module: ModuleType) -> None:
    """Wrap the module's load_nifti before ctray.ingest.shards binds the name (`from ... import`)."""
    load = vars(module)["load_nifti"]

    def load_nifti(path: str, *args: Any, **kwargs: Any) -> Any:
        if _in_ray_worker() and _MARKER in os.path.basename(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return load(path, *args, **kwargs)

    vars(module)["load_nifti"] = load_nifti


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches ctray.ingest.volume once it is executed, whoever imports it."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                execute(module)
                _kill_on_load(module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _MARKER:
    sys.meta_path.insert(0, _AfterImport())
