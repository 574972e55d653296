"""Imported by every Python process of the multi-node tests' fake clusters (their PYTHONPATH): what
the simulator lacks or gets wrong about real clusters.

1. Ray's fake multi-node provider runs every "node" on this machine in the head's session folder,
   so the nodes share one `runtime_resources/` where real nodes each have their own disk. Ray's
   working_dir plugin (re)creates a job's folder there with overwrite=True whenever a node sets the
   job's environment up, deleting the files another node's worker is importing at that moment
   (`ModuleNotFoundError: No module named 'ctray.ingest.dicom'` in a shard task, under load). Here
   an extracted package is kept: its URI is the hash of its content, so the files are the same.
2. Autoscaler v2 fills a cluster config out with its provider's defaults file, and the pip wheel
   lacks the fake provider's (`fake_multi_node/example.yaml`): v2's monitor would die at start.
   The tests' own `fake_defaults.yaml` (beside this file) stands in for it.
3. A node type states its `memory`, as cloud node types do (Ray's AWS launcher fills it in; the
   autoscaler packs memory requests by it), but the fake provider hands every resource it does not
   know to `ray start` as a custom one, which Ray refuses for memory: the node failed to launch.
   Here it starts the node with that much memory instead."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys


def _keep_extracted(module) -> None:
    unpack = module.download_and_unpack_package

    async def download_and_unpack_package(*args, **kwargs):
        kwargs["overwrite"] = False
        return await unpack(*args, **kwargs)

    module.download_and_unpack_package = download_and_unpack_package


def _fake_defaults(module) -> None:
    path = os.path.join(os.path.dirname(__file__), "fake_defaults.yaml")
    module._DEFAULT_CONFIGS["fake_multinode"] = lambda: path


def _node_memory(module) -> None:
    import ray._private.parameter as parameter

    cls = module.FakeMultiNodeProvider
    create = cls._create_node_with_resources_and_labels

    def create_node(self, node_config, tags, count, resources, labels):
        resources = dict(resources)
        memory = resources.pop("memory", None)
        original = parameter.RayParams

        class WithMemory(original):
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("memory", memory)
                super().__init__(*args, **kwargs)

        parameter.RayParams = WithMemory  # the provider looks it up at each call
        try:
            return create(self, node_config, tags, count, resources, labels)
        finally:
            parameter.RayParams = original

    cls._create_node_with_resources_and_labels = create_node


_PATCHES = {
    "ray._private.runtime_env.working_dir": _keep_extracted,
    "ray.autoscaler._private.providers": _fake_defaults,
    "ray.autoscaler._private.fake_multi_node.node_provider": _node_memory,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches each module of _PATCHES once it is executed, whoever imports it."""

    def find_spec(self, name, path, target=None):
        patch = _PATCHES.pop(name, None)
        if patch is None:
            return None
        if not _PATCHES:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                patch(module)

            spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterImport())
