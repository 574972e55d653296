"""Joining or starting Ray the same way for every command, and refusing work no node can run."""

from __future__ import annotations

import json
import logging
import os
import re
import time

from ctray.config import RayConfig
from ctray.errors import ConfigError

log = logging.getLogger(__name__)

# Node types the read-only autoscaler of a cluster without autoscaling config invents from its
# nodes: "node_<node id>". Any other name is a node type an autoscaler can launch.
_READONLY_TYPE = re.compile(r"^node_[0-9a-f]{56}$")


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


def _fits(resources: dict, shape: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in shape.items() if v > 0)


def _autoscaler_report() -> dict | None:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw).get("autoscaler_report") if raw else None


def _can_autoscale(report: dict | None) -> bool:
    if not report:
        return False
    types = set((report.get("node_type_mapping") or {}).values())
    types |= set((report.get("node_availability_summary") or {}).get("node_availabilities") or {})
    return bool(report.get("pending_launches") or report.get("pending_nodes")) or any(
        not _READONLY_TYPE.match(t) for t in types
    )


def _node_types() -> list[dict] | None:
    """The resources of each node type the autoscaler may launch, where it publishes them (Ray's
    autoscaler v2, KubeRay's with `version: v2`); None where it does not (v1)."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS without the key: fall back to waiting
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        {k: float(v) for k, v in g.resources.items() if k in ("CPU", "GPU", "TPU")}
        for g in config.node_group_configs
        if g.max_count != 0
    ]


def _largest_nodes() -> str:
    import ray

    shapes = sorted(
        {
            json.dumps({k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU", "TPU")}, sort_keys=True)
            for n in ray.nodes()
            if n["Alive"]
        }
    )
    return ", ".join(s if s != "{}" else "no CPU or GPU" for s in shapes) or "none"


def ensure_schedulable(shape: dict[str, float], what: str, timeout_s: float = 45.0) -> None:
    """Return once some node can run one `shape` (e.g. {"CPU": 1, "GPU": 1}); otherwise fail with
    one line instead of letting the work wait forever.

    A cluster without an autoscaler fails at once. With one, ctray asks for such a node through a
    one-bundle placement group (demand the autoscaler acts on; unlike `request_resources`, it is
    not a cluster-wide slot that Ray Train's own requests overwrite) and waits: while the
    autoscaler is launching nodes the wait goes on (cloud nodes take minutes), and when
    `timeout_s` passes with no launch and no node that fits, no node type of the cluster offers the
    shape. (Ray's autoscaler reports infeasible tasks once, and infeasible placement groups, which
    Ray Train and Tune use, not at all.)"""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if any(_fits(n["Resources"], shape) for n in ray.nodes() if n["Alive"]):
        return
    wanted = ", ".join(f"{v:g} {k}" for k, v in shape.items() if v > 0)
    types = _node_types()
    if types is not None and not any(_fits(t, shape) for t in types):
        offered = ", ".join(sorted({json.dumps(t, sort_keys=True) for t in types})) or "none"
        raise ConfigError(
            f"no node type of this cluster can run one {what} ({wanted}); its node types offer: {offered}"
        )
    if types is None and not _can_autoscale(_autoscaler_report()):
        raise ConfigError(
            f"no node of this Ray cluster can run one {what} ({wanted}); its nodes offer: {_largest_nodes()}"
        )
    log.info("no node can run one %s (%s) yet; asking the autoscaler for one", what, wanted)
    probe = placement_group(
        [{k: v for k, v in shape.items() if v > 0}], strategy="PACK", name="ctray-schedulable-probe"
    )
    try:
        deadline = time.time() + timeout_s
        next_note = time.time() + 30
        while time.time() < deadline:
            ready, _ = ray.wait([probe.ready()], timeout=2)
            if ready:
                return
            report = _autoscaler_report() or {}
            launching = sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
            if launching:
                deadline = max(deadline, time.time() + timeout_s)
                if time.time() > next_note:
                    log.info(
                        "waiting for %d node(s) the autoscaler is launching, for one %s (%s)", launching, what, wanted
                    )
                    next_note = time.time() + 30
        raise ConfigError(
            f"no node type of this cluster can run one {what} ({wanted}): the autoscaler launched none in "
            f"{timeout_s:.0f} s; nodes now: {_largest_nodes()}"
        )
    finally:
        remove_placement_group(probe)
