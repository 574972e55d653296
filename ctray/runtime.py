"""Joining or starting Ray, the same way for every command."""

from __future__ import annotations

import logging
import os

from ctray.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster, the one `ray job submit` set up (RAY_ADDRESS), or start a
    local Ray. A Ray already initialised in this process (tests, notebooks) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = {} if address else {"num_cpus": cfg.num_cpus}
    ray.init(address=address, log_to_driver=True, **kwargs)
    log.info("ray: %s", "connected to " + address if address else "local instance")
