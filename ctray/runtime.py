"""Joining or starting Ray the same way for every command, and refusing work no node can run."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

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
    context = ray.init(address=address, log_to_driver=True, **kwargs)
    dashboard = getattr(context, "dashboard_url", None)
    log.info(
        "ray: %s%s",
        "connected to " + address if address else "local instance",
        f", dashboard http://{dashboard.removeprefix('http://')}" if dashboard else "",
    )


_KINDS = ("CPU", "GPU", "TPU", "memory")
"""The resources ctray's work asks for, and so compares with what nodes offer."""


def fits(resources: dict, shape: dict[str, float]) -> bool:
    """Whether `resources` holds `shape`; memory only where it is stated (a node type may not)."""
    return all(resources.get(k, float("inf") if k == "memory" else 0.0) >= v for k, v in shape.items() if v > 0)


def describe(resources: dict[str, float]) -> str:
    """{"CPU": 1, "memory": 2**31} -> "1 CPU, 2 GiB memory"; {} -> "no CPU or GPU"."""
    parts = [
        f"{resources[k] / 2**30:.4g} GiB memory" if k == "memory" else f"{resources[k]:g} {k}"
        for k in _KINDS
        if resources.get(k, 0) > 0
    ]
    return ", ".join(parts) or "no CPU or GPU"


def autoscaler_report() -> dict | None:
    """Autoscaler v1's status, which its monitor writes to the GCS; None under v2 or none."""
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


def autoscaler_v2() -> bool:
    """Whether the cluster runs Ray's autoscaler v2 (the default of `ray up` since Ray 2.50 and of
    KubeRay). It writes no v1 status: its state is read through the GCS (`autoscaler_v2_state`)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    try:
        return is_autoscaler_v2(fetch_from_server=True)
    except Exception:  # a GCS too old to know the key
        return False


def autoscaler_v2_state() -> Any:
    """Autoscaler v2's view: pending, failed and infeasible requests and the nodes it runs (a
    `GetClusterStatusReply`). `ray.autoscaler.v2.sdk.get_cluster_status` parses the same reply but
    drops the infeasible requests, which are what tells a job that no node type fits it."""
    import ray
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
    return reply


def _infeasible_v2(state: Any, shape: dict[str, float]) -> bool:
    wanted = {k: v for k, v in shape.items() if v > 0}
    scaling = state.autoscaling_state
    bundles = [r.resources_bundle for r in scaling.infeasible_resource_requests]
    bundles += [r.resources_bundle for g in scaling.infeasible_gang_resource_requests for r in g.requests]
    return any(dict(b) == wanted for b in bundles)


def _launching(v2_state: Any) -> tuple[int, str]:
    """Nodes the autoscaler is launching, and its last failed launch (a cloud's refusal: quota,
    capacity, a bad image) in words, or "". `v2_state`: autoscaler v2's (None: v1's report)."""
    if v2_state is not None:
        scaling = v2_state.autoscaling_state
        count = sum(r.count for r in scaling.pending_instance_requests) + len(scaling.pending_instances)
        failed = max(scaling.failed_instance_requests, key=lambda r: r.failed_ts, default=None)
        why = f"{failed.count} {failed.ray_node_type_name} node(s) failed to launch: {failed.reason}" if failed else ""
        return count, why.splitlines()[0] if why else ""
    report = autoscaler_report() or {}
    count = sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
    return count, ""


def published_node_types() -> dict[str, dict[str, Any]] | None:
    """Each node type of the cluster's published config (KubeRay's autoscaler publishes it; Ray's
    own v1 and v2 do not: None): {name: {"resources", "min_workers", "max_workers"}}."""
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS without the key: fall back to waiting
        return None
    if config is None or not config.node_group_configs:
        return None
    return {
        g.name: {
            "resources": {k: float(v) for k, v in g.resources.items() if k in _KINDS},
            "min_workers": g.min_count,
            "max_workers": g.max_count,
        }
        for g in config.node_group_configs
    }


def _largest_nodes() -> str:
    import ray

    shapes = sorted({describe(n["Resources"]) for n in ray.nodes() if n["Alive"]})
    return "; ".join(shapes) or "none"


def ensure_schedulable(shape: dict[str, float], what: str, timeout_s: float = 45.0) -> None:
    """Return once some node can run one `shape` (e.g. {"CPU": 1, "GPU": 1}); otherwise fail with
    one line instead of letting the work wait forever.

    A cluster without an autoscaler fails at once. With one, ctray asks for such a node through a
    one-bundle placement group (demand the autoscaler acts on; unlike `request_resources`, it is
    not a cluster-wide slot that Ray Train's own requests overwrite) and waits: while the
    autoscaler is launching nodes the wait goes on (cloud nodes take minutes). Autoscaler v2 says
    when no node type fits the request (its infeasible requests): that fails at once. v1 reports
    infeasible tasks once, and infeasible placement groups, which Ray Train and Tune use, not at
    all: when `timeout_s` passes with no launch and no node that fits, no node type offers it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if any(fits(n["Resources"], shape) for n in ray.nodes() if n["Alive"]):
        return
    wanted = describe(shape)
    published = published_node_types()
    types = None if published is None else [t["resources"] for t in published.values() if t["max_workers"] != 0]
    if types is not None and not any(fits(t, shape) for t in types):
        offered = "; ".join(sorted({describe(t) for t in types})) or "none"
        raise ConfigError(
            f"no node type of this cluster can run one {what} ({wanted}); its node types offer: {offered}"
        )
    v2 = autoscaler_v2()
    if types is None and not v2 and not _can_autoscale(autoscaler_report()):
        raise ConfigError(
            f"no node of this Ray cluster can run one {what} ({wanted}); its nodes offer: {_largest_nodes()}"
        )
    log.info("no node can run one %s (%s) yet; asking the autoscaler for one", what, wanted)
    probe = placement_group(
        [{k: v for k, v in shape.items() if v > 0}], strategy="PACK", name="ctray-schedulable-probe"
    )
    failed = ""
    try:
        deadline = time.time() + timeout_s
        next_note = time.time() + 30
        while time.time() < deadline:
            ready, _ = ray.wait([probe.ready()], timeout=2)
            if ready:
                return
            state = autoscaler_v2_state() if v2 else None
            if state is not None and _infeasible_v2(state, shape):
                raise ConfigError(
                    f"no node type of this cluster can run one {what} ({wanted}): the autoscaler reports the "
                    f"request infeasible; nodes now: {_largest_nodes()}"
                )
            launching, failed = _launching(state)
            if launching:
                deadline = max(deadline, time.time() + timeout_s)
                if time.time() > next_note:
                    log.info(
                        "waiting for %d node(s) the autoscaler is launching, for one %s (%s)", launching, what, wanted
                    )
                    next_note = time.time() + 30
        raise ConfigError(
            f"no node type of this cluster can run one {what} ({wanted}): the autoscaler launched none in "
            f"{timeout_s:.0f} s; nodes now: {_largest_nodes()}" + (f"; {failed}" if failed else "")
        )
    finally:
        remove_placement_group(probe)
