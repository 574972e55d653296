"""Imported by every Python process of test_multinode.py's fake cluster (its PYTHONPATH): the one
thing the simulator gets wrong about real clusters.

Ray's fake multi-node provider runs every "node" on this machine in the head's session folder, so
the nodes share one `runtime_resources/` where real nodes each have their own disk. Ray's
working_dir plugin (re)creates a job's folder there with overwrite=True whenever a node sets the
job's environment up, deleting the files another node's worker is importing at that moment
(`ModuleNotFoundError: No module named 'ctray.ingest.dicom'` in a shard task, under load). Here an
extracted package is kept: its URI is the hash of its content, so the files are the same."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_PLUGIN = "ray._private.runtime_env.working_dir"


def _keep_extracted(module) -> None:
    unpack = module.download_and_unpack_package

    async def download_and_unpack_package(*args, **kwargs):
        kwargs["overwrite"] = False
        return await unpack(*args, **kwargs)

    module.download_and_unpack_package = download_and_unpack_package


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches the plugin module once it is executed, whoever imports it."""

    def find_spec(self, name, path, target=None):
        if name != _PLUGIN:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                _keep_extracted(module)

            spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterImport())
