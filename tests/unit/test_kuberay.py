"""cluster/kuberay/*.yaml as the KubeRay operator and the nodes that run them would take them.

`kubectl apply` checks a manifest against the CRD schema only (tests/unit/test_cluster_configs.py); the
operator then runs its own checks and, on a failure, leaves the RayCluster or RayJob idle with an
event, so a bad manifest applies cleanly and never runs. The functions under "KubeRay's checks"
re-state those checks in Python: `ValidateRayClusterMetadata`, `ValidateRayClusterSpec`,
`ValidateRayClusterUpgradeOptions`, `ValidateRayJobMetadata` and `ValidateRayJobSpec` (with
`validateDeletionConfiguration`, `validateLegacyDeletionPolicies`, `validateDeletionRules`,
`validateTTLConsistency`, `validateRayGroupResources`, `validateRayGroupLabels`,
`validateWorkerGroupIdleTimeout`) of ray-operator/controllers/ray/utils/validation.go, and the unique
group names of ray-operator/pkg/webhooks/v1/raycluster_webhook.go, both of KubeRay v1.7.0 (tag v1.7.0,
commit 59d663aeec13760646da3db9c1cf8cfe883e30b7, Apache-2.0): the version of the CRD schemas in
cluster/kuberay/crds. Messages are the operator's format strings, so a failure reads as
`kubectl describe` shows it; Kubernetes' own name/label messages (apimachinery) are abridged. Feature
gates are v1.7.0's defaults, so the checks of RayJobDeletionPolicy being off (it is on) never fire and
are left out. Not ported either, as these manifests use none of it: GCS fault tolerance's backend
options, the history server's collector, network policy and TLS rules past their feature gates,
worker-group priority, and the status checks. In clusterSelector mode v1.7.0 has no rule about
shutdownAfterJobFinishes: the controller just never deletes a selected cluster. To follow a newer
KubeRay, diff validation.go between the tags and update the functions with the CRDs.

Below them, what KubeRay does not check but a pod needs: GPU groups that a node autoscaler can create
from zero, EFA for NCCL, and a /dev/shm for Ray's object store."""

import copy
import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.version import InvalidVersion, Version
from ray._private import ray_constants

from helpers import REPO, efa_plugin

KUBERAY = REPO / "cluster" / "kuberay"
Doc = dict[str, Any]

# ---------------------------------------------------------------------------------------------------
# KubeRay's checks (validation.go, v1.7.0). Each generator yields the operator's errors in its order;
# the operator reports the first (`_first`).

MAX_RAYCLUSTER_NAME = 53  # utils/constant.go: MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # MaxRayJobNameLength
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
FT_ANNOTATION = "ray.io/ft-enabled"
GATES = {  # pkg/features/features.go defaults, of the gates whose checks can fire
    "RayClusterHistoryServer": False,
    "RayClusterNetworkPolicy": False,
    "RayClusterMTLS": False,
}

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _first(errors: Iterator[str]) -> str | None:
    return next(errors, None)


def _go_list(errors: list[str]) -> str:
    return "[" + " ".join(errors) + "]"  # Go's %v of a []string


def _dns1035_errors(value: str) -> list[str]:
    errors = ["must be no more than 63 characters"] if len(value) > 63 else []
    if not _DNS1035.fullmatch(value):
        errors.append(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an"
            " alphabetic character, and end with an alphanumeric character (regex used for validation is"
            f" '{_DNS1035.pattern}')"
        )
    return errors


def _label_key_errors(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    errors = []
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        errors.append("prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters")
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        errors.append(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an"
            " alphanumeric character"
        )
    return errors


def _label_value_errors(value: str) -> list[str]:
    if value == "" or (len(value) <= 63 and _LABEL_NAME.fullmatch(value)):
        return []
    return [
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must"
        " start and end with an alphanumeric character"
    ]


def _env(container: Doc) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def _head_container(spec: Doc) -> Doc:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def _autoscaling(spec: Doc | None) -> bool:  # utils/util.go: IsAutoscalingEnabled
    return bool(spec and spec.get("enableInTreeAutoscaling"))


def _autoscaling_v2(spec: Doc) -> bool:  # IsAutoscalingV2Enabled
    return (spec.get("autoscalerOptions") or {}).get("version") == "v2"


def validate_ray_cluster_metadata(metadata: Doc) -> Iterator[str]:
    name = metadata.get("name", "")
    if len(name) > MAX_RAYCLUSTER_NAME:
        yield f"RayCluster name should be no more than {MAX_RAYCLUSTER_NAME} characters"
    if errors := _dns1035_errors(name):
        yield f"RayCluster name should be a valid DNS1035 label: {_go_list(errors)}"


def _group_resources_and_labels(group_name: str, group: Doc) -> Iterator[str]:
    """validateRayGroupResources, validateRayGroupLabels."""
    params = group.get("rayStartParams") or {}
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        yield (
            f"resource fields should not be set in both rayStartParams and Resources for {group_name} group;"
            " please use only one"
        )
    if "labels" in params:
        yield (
            f"rayStartParams['labels'] is not supported for {group_name} group; please use the top-level Labels"
            " field instead"
        )
    errors = []
    for key, value in sorted((group.get("labels") or {}).items()):
        errors += [f"invalid label key for {group_name} group: '{key}', error: {e}" for e in _label_key_errors(key)]
        errors += [
            f"invalid label value for key '{key}' in {group_name} group: '{value}', error: {e}"
            for e in _label_value_errors(value)
        ]
    if errors:
        yield "; ".join(errors)


def _worker_group(group: Doc, spec: Doc) -> Iterator[str]:
    name, low, high = group.get("groupName", ""), group.get("minReplicas"), group.get("maxReplicas")
    if not group["template"]["spec"].get("containers"):
        yield "workerGroupSpec should have at least one container"
    if not _autoscaling(spec) and (low is None or high is None):
        yield f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
    if low is not None and low < 0:
        yield f"worker group {name} has negative minReplicas {low}"
    if high is not None and high < 0:
        yield f"worker group {name} has negative maxReplicas {high}"
    if low is not None and high is not None and low > high:
        yield f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
    yield from _group_resources_and_labels(name, group)
    idle = group.get("idleTimeoutSeconds")  # validateWorkerGroupIdleTimeout
    if idle is not None and idle < 0:
        yield f"worker group {name}: idleTimeoutSeconds must be non-negative, got {idle}"
    v2 = _autoscaling_v2(spec) or _env(_head_container(spec)).get(AUTOSCALER_V2_ENV) in ("1", "true")
    if idle is not None and not v2:
        yield (
            f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled. Please set"
            f" .spec.autoscalerOptions.version to 'v2' (or set {AUTOSCALER_V2_ENV} environment variable to 'true'"
            " in the head pod if using KubeRay < 1.4.0)"
        )


def _fault_tolerance(spec: Doc, annotations: Doc) -> Iterator[str]:
    ft_options, head = spec.get("gcsFaultToleranceOptions"), _head_container(spec)
    env, params = _env(head), spec["headGroupSpec"].get("rayStartParams") or {}
    if annotations.get(FT_ANNOTATION) and ft_options is not None:
        yield (
            f"{FT_ANNOTATION} annotation and GcsFaultToleranceOptions are both set. Please use only"
            " GcsFaultToleranceOptions to configure GCS fault tolerance"
        )
    ft_enabled = str(annotations.get(FT_ANNOTATION, "")).lower() == "true" or ft_options is not None
    if not ft_enabled and "RAY_REDIS_ADDRESS" in env:
        yield (
            "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions"
            " is not set. Please set GcsFaultToleranceOptions to enable GCS fault tolerance"
        )
    if ft_options is not None:
        if params.get("redis-password"):
            yield (
                "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled - use"
                " GcsFaultToleranceOptions.RedisPassword instead"
            )
        for var, field in (("REDIS_PASSWORD", "RedisPassword"), ("RAY_REDIS_ADDRESS", "RedisAddress")):
            if var in env:
                yield (
                    f"cannot set `{var}` env var in head Pod when GcsFaultToleranceOptions is enabled - use"
                    f" GcsFaultToleranceOptions.{field} instead"
                )
        if annotations.get("ray.io/external-storage-namespace"):
            yield (
                "cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is"
                " enabled - use GcsFaultToleranceOptions.ExternalStorageNamespace instead"
            )
    if params.get("redis-username") or "REDIS_USERNAME" in env:
        yield (
            "cannot set redis username in rayStartParams or environment variables - use"
            " GcsFaultToleranceOptions.RedisUsername instead"
        )


def _autoscaler_enabled(spec: Doc) -> Iterator[str]:
    groups = spec.get("workerGroupSpecs") or []
    for g in groups:
        if g.get("suspend"):
            yield f"worker group {g['groupName']} cannot be suspended with Autoscaler enabled"
    if (spec.get("autoscalerOptions") or {}).get("version") is not None and AUTOSCALER_V2_ENV in _env(
        _head_container(spec)
    ):
        yield (
            f"both .spec.autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set, please only"
            " use the former"
        )
    if _autoscaling_v2(spec):
        if spec["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") != "Never":
            yield "restartPolicy for head Pod should be Never or unset when using autoscaler V2"
        for g in groups:
            if g["template"]["spec"].get("restartPolicy", "Never") != "Never":
                yield (
                    f"restartPolicy for worker group {g['groupName']} should be Never or unset when using autoscaler V2"
                )


def _autoscaler(spec: Doc) -> Iterator[str]:
    options = spec.get("autoscalerOptions") or {}
    v2_env = _env(_head_container(spec)).get(AUTOSCALER_V2_ENV)
    if not _autoscaling(spec) and v2_env in ("1", "true"):
        yield (
            f"environment variable {AUTOSCALER_V2_ENV} cannot be set to '{v2_env}' when enableInTreeAutoscaling"
            " is false. Please set enableInTreeAutoscaling: true to use autoscaler v2"
        )
    if _autoscaling(spec):
        yield from _autoscaler_enabled(spec)
    if options.get("idleTimeoutSeconds", 0) < 0:
        yield f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {options['idleTimeoutSeconds']}"
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in _env(options):
        yield (
            "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD: it is managed by KubeRay"
            " and injected automatically into the autoscaler container"
        )


def _auth_and_gated(spec: Doc) -> Iterator[str]:
    auth = spec.get("authOptions") or {}
    k8s_auth, ray_version = bool(auth.get("enableK8sTokenAuth")), spec.get("rayVersion", "")
    if spec.get("historyServerOptions") is not None and not GATES["RayClusterHistoryServer"]:
        yield "RayClusterHistoryServer feature gate is not enabled"
    if auth.get("mode") == "token":
        if not ray_version:
            yield (
                "authOptions.mode is 'token' but RayVersion was not specified. Ray version 2.52.0 or later is required"
            )
        try:
            version = Version(ray_version)
        except InvalidVersion as e:
            yield f"authOptions.mode is 'token' but RayVersion format is invalid: {ray_version}, {e}"
            return
        if version < Version("2.52.0"):
            yield f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {ray_version}"
        if k8s_auth and version < Version("2.55.0"):
            yield f"authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0, got {ray_version}"
        if k8s_auth and auth.get("secretName"):
            yield "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set"
    elif k8s_auth:
        yield "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
    if spec.get("networkPolicy") is not None and not GATES["RayClusterNetworkPolicy"]:
        yield "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to be enabled"
    if spec.get("tlsOptions") is not None and not GATES["RayClusterMTLS"]:
        yield "spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled"


def validate_ray_cluster_spec(spec: Doc, annotations: Doc) -> Iterator[str]:
    head = spec["headGroupSpec"]
    if not head["template"]["spec"].get("containers"):
        yield "headGroupSpec should have at least one container"
        return
    yield from _group_resources_and_labels("Head", head)
    for group in spec.get("workerGroupSpecs") or []:
        yield from _worker_group(group, spec)
    yield from _fault_tolerance(spec, annotations)
    yield from _autoscaler(spec)
    yield from _auth_and_gated(spec)


def validate_ray_cluster_upgrade_options(spec: Doc) -> Iterator[str]:
    kind = (spec.get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in ("Recreate", "None"):
        yield (
            f"The RayCluster spec is invalid: Spec.UpgradeStrategy.Type value {kind} is invalid, valid options are"
            " Recreate or None"
        )


def validate_worker_group_names(spec: Doc) -> Iterator[str]:  # raycluster_webhook.go: validateWorkerGroups
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs") or []]
    if len(set(names)) < len(names):
        yield "worker group names must be unique"


def validate_ray_job_metadata(metadata: Doc) -> Iterator[str]:
    name = metadata.get("name", "")
    if len(name) > MAX_RAYJOB_NAME:
        yield f"The RayJob metadata is invalid: RayJob name should be no more than {MAX_RAYJOB_NAME} characters"
    if errors := _dns1035_errors(name):
        yield f"The RayJob metadata is invalid: RayJob name should be a valid DNS1035 label: {_go_list(errors)}"


def _legacy_deletion(spec: Doc) -> Iterator[str]:  # validateLegacyDeletionPolicies
    strategy = spec["deletionStrategy"]
    on_success, on_failure = strategy.get("onSuccess"), strategy.get("onFailure")
    if on_success is None or on_failure is None:
        yield (
            "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set when using the legacy"
            " deletion policy fields of DeletionStrategy"
        )
        return
    for field, policy in (("OnSuccess", on_success.get("policy")), ("OnFailure", on_failure.get("policy"))):
        if policy is None:
            yield (
                f"the DeletionPolicyType field of DeletionStrategy.{field} cannot be unset when DeletionStrategy"
                " is enabled"
            )
            return
    policies = {"success": on_success["policy"], "failure": on_failure["policy"]}
    if spec.get("clusterSelector"):
        for when, policy in policies.items():
            if policy in ("DeleteCluster", "DeleteWorkers"):
                yield f"the ClusterSelector mode doesn't support DeletionStrategy={policy} on {when}"
    if "DeleteWorkers" in policies.values() and _autoscaling(spec.get("rayClusterSpec")):
        yield "DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled"
    if spec.get("shutdownAfterJobFinishes") and "DeleteNone" in policies.values():
        yield (  # sic: "Finshes"
            "The RayJob spec is invalid: shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'"
        )


def _deletion_rule(i: int, rule: Doc, spec: Doc) -> str | None:
    condition, policy = rule.get("condition") or {}, rule.get("policy")
    has_job, has_deployment = "jobStatus" in condition, "jobDeploymentStatus" in condition
    if has_job and has_deployment:
        return f"deletionRules[{i}]: cannot set both JobStatus and JobDeploymentStatus at the same time"
    if not has_job and not has_deployment:
        return f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set"
    if condition.get("ttlSeconds", 0) < 0:
        return f"deletionRules[{i}]: TTLSeconds must be non-negative"
    if spec.get("clusterSelector") and policy in ("DeleteCluster", "DeleteWorkers"):
        return f"deletionRules[{i}]: DeletionPolicyType '{policy}' not supported when ClusterSelector is set"
    if _autoscaling(spec.get("rayClusterSpec")) and policy == "DeleteWorkers":
        return f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled"
    return None


def _deletion_rules(spec: Doc) -> Iterator[str]:  # validateDeletionRules + validateTTLConsistency
    errors: list[str] = []
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(spec["deletionStrategy"]["deletionRules"]):
        if error := _deletion_rule(i, rule, spec):
            errors.append(error)
            continue
        condition, policy = rule["condition"], rule["policy"]
        kind = "JobStatus" if "jobStatus" in condition else "JobDeploymentStatus"
        status = condition.get("jobStatus") or condition["jobDeploymentStatus"]
        by_policy = ttls.setdefault((kind, status), {})
        if policy in by_policy:
            errors.append(f"deletionRules[{i}]: duplicate rule for DeletionPolicyType '{policy}' and {kind} '{status}'")
            continue
        by_policy[policy] = condition.get("ttlSeconds", 0)
    for (kind, status), by_policy in ttls.items():
        order = [(p, by_policy[p]) for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
        errors += [
            f"for {kind} '{status}': {p} TTL ({ttl}) must be >= {prev} TTL ({prev_ttl})"
            for (prev, prev_ttl), (p, ttl) in itertools.pairwise(order)
            if ttl < prev_ttl
        ]
    if errors:
        yield "\n".join(errors)  # errors.Join


def _deletion_configuration(spec: Doc) -> Iterator[str]:  # validateDeletionConfiguration
    shutdown, strategy = spec.get("shutdownAfterJobFinishes", False), spec.get("deletionStrategy")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        yield (
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false cannot have"
            " TTLSecondsAfterFinished"
        )
    if strategy is None:
        return
    legacy = strategy.get("onSuccess") is not None or strategy.get("onFailure") is not None
    rules = bool(strategy.get("deletionRules"))
    if rules and shutdown:
        yield (
            "The RayJob spec is invalid: spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are"
            " mutually exclusive"
        )
    if rules and legacy:
        yield (
            "The RayJob spec is invalid: Cannot use both legacy onSuccess/onFailure fields and deletionRules"
            " simultaneously"
        )
    if legacy:
        yield from _legacy_deletion(spec)
    elif rules:
        yield from _deletion_rules(spec)
    else:
        yield (
            "The RayJob spec is invalid: DeletionStrategy requires either BOTH onSuccess and onFailure, OR the"
            " deletionRules field (cannot be empty)"
        )


def _submission(spec: Doc) -> Iterator[str]:
    selector, mode, backoff = spec.get("clusterSelector") or {}, spec.get("submissionMode"), spec.get("backoffLimit")
    if spec.get("suspend") and selector:
        yield "The RayJob spec is invalid: the ClusterSelector mode doesn't support the suspend operation"
    if spec.get("rayClusterSpec") is None and not selector:
        yield "The RayJob spec is invalid: one of RayClusterSpec or ClusterSelector must be set"
    if selector:
        if not selector.get("ray.io/cluster"):  # RayJobClusterSelectorKey
            yield "cluster name in ClusterSelector should not be empty"
        if mode == "SidecarMode":
            yield "ClusterSelector is not supported in SidecarMode"
        if backoff is not None and backoff > 0:
            yield "The RayJob spec is invalid: BackoffLimit is incompatible with ClusterSelector mode"
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        yield "The RayJob spec is invalid: BackoffLimit is incompatible with InteractiveMode"
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None:
            yield "Currently, SidecarMode doesn't support SubmitterPodTemplate"
        if spec.get("submitterConfig") is not None:
            yield "Currently, SidecarMode doesn't support SubmitterConfig"
        if spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") != "Never":
            yield "restartPolicy for head Pod should be Never or unset when using SidecarMode"


def validate_ray_job_spec(job: Doc) -> Iterator[str]:
    spec = job["spec"]
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        yield (
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false is not allowed to be"
            " suspended"
        )
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        yield "The RayJob spec is invalid: TTLSecondsAfterFinished must be a non-negative integer"
    yield from _deletion_configuration(spec)
    yield from _submission(spec)
    if (cluster := spec.get("rayClusterSpec")) is not None:
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            yield "The RayJob spec is invalid: K8s token auth mode is currently not supported for RayJob"
        annotations = job["metadata"].get("annotations") or {}
        yield from (f"The RayJob spec is invalid: {e}" for e in validate_ray_cluster_spec(cluster, annotations))
    text = spec.get("runtimeEnvYAML", "")
    try:  # dashboardclient.UnmarshalRuntimeEnvYAML: YAML of a map (or nothing), not its schema
        env = yaml.safe_load(text)
        if env is not None and not isinstance(env, dict):
            raise yaml.YAMLError(f"cannot unmarshal {type(env).__name__} into Go value of type types.RuntimeEnvType")
    except yaml.YAMLError as e:
        yield f"failed to unmarshal RuntimeEnvYAML: {text}: {e}"
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            yield f"The RayJob spec is invalid: {field} must be a positive integer"
    if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
        yield "The RayJob spec is invalid: backoffLimit must be a positive integer"


def kuberay_rejects(doc: Doc) -> str | None:
    """The first error the operator (and its webhook) would report for a RayCluster or RayJob, or None."""
    meta, spec = doc["metadata"], doc["spec"]
    if doc["kind"] == "RayCluster":
        return _first(
            e
            for check in (
                validate_ray_cluster_metadata(meta),
                validate_worker_group_names(spec),
                validate_ray_cluster_spec(spec, meta.get("annotations") or {}),
                validate_ray_cluster_upgrade_options(spec),
            )
            for e in check
        )
    return _first(e for check in (validate_ray_job_metadata(meta), validate_ray_job_spec(doc)) for e in check)


# ---------------------------------------------------------------------------------------------------
# The manifests, and copies broken one rule at a time.

DROP = object()


def _load(name: str) -> Doc:
    return yaml.safe_load((KUBERAY / name).read_text())


def _owned_job() -> Doc:
    """rayjob-pretrain.yaml as a job that brings its own copy of the cluster and deletes it an hour after."""
    job = _load("rayjob-pretrain.yaml")
    del job["spec"]["clusterSelector"]
    job["spec"] |= {
        "rayClusterSpec": _load("raycluster.yaml")["spec"],
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
    }
    return job


BASES: dict[str, Callable[[], Doc]] = {
    "cluster": lambda: _load("raycluster.yaml"),
    "job": lambda: _load("rayjob-ingest.yaml"),
    "owned": _owned_job,
}


def _mutate(doc: Doc, changes: dict[str, Any]) -> Doc:
    """A copy of doc with each dotted path ("spec.workerGroupSpecs.1.minReplicas") set, or deleted (DROP)."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node: Any = doc
        for key in parents:
            node = node[key] if isinstance(key, int) else node.setdefault(key, {})
        if value is DROP:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return doc


def _crd_validator(name: str) -> Any:
    schema = json.loads((KUBERAY / "crds" / f"{name}.v1.json").read_text())["openAPIV3Schema"]
    return jsonschema.validators.validator_for(schema)(schema)  # built once: checking the schema costs ~0.5 s


CRD = {"RayCluster": _crd_validator("rayclusters"), "RayJob": _crd_validator("rayjobs")}
W0, W1 = "spec.workerGroupSpecs.0", "spec.workerGroupSpecs.1"  # cpu-ingest, gpu-h100
HEAD = "spec.headGroupSpec"
HEAD_ENV = f"{HEAD}.template.spec.containers.0.env"
OWNED = "spec.rayClusterSpec"
FT = {"spec.gcsFaultToleranceOptions": {"redisAddress": "redis:6379"}}
SECRET_ENV = [{"name": "CTRAY_ID_KEY", "value": "x"}]
RULE = {"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED"}}

MIN_MAX_REQUIRED = "worker group cpu-ingest must set both minReplicas and maxReplicas when autoscaling is disabled"
UPGRADE_TYPE = (
    "The RayCluster spec is invalid: Spec.UpgradeStrategy.Type value Rolling is invalid, valid options are "
    "Recreate or None"
)
NEGATIVE_RULE_TTL = "deletionRules[0]: TTLSeconds must be non-negative"
NEGATIVE_TTL, FAILED = {"jobStatus": "FAILED", "ttlSeconds": -1}, {"jobDeploymentStatus": "Failed"}
PRE_RUNNING_DEADLINE = "The RayJob spec is invalid: preRunningDeadlineSeconds must be a positive integer"
# The schema has these too (through kubectl, the API server fills in min/maxReplicas from its defaults).
ALSO_IN_SCHEMA = {MIN_MAX_REQUIRED, UPGRADE_TYPE, PRE_RUNNING_DEADLINE, NEGATIVE_RULE_TTL}

# (base, changes, KubeRay's message; "..." at the end: its start, the rest is Kubernetes' or YAML's)
BROKEN: list[tuple[str, dict[str, Any], str]] = [
    # ValidateRayClusterMetadata
    ("cluster", {"metadata.name": "c" * 54}, "RayCluster name should be no more than 53 characters"),
    ("cluster", {"metadata.name": "Ctray"}, "RayCluster name should be a valid DNS1035 label: ..."),
    # the webhook
    ("cluster", {f"{W1}.groupName": "cpu-ingest"}, "worker group names must be unique"),
    # ValidateRayClusterSpec: groups
    ("cluster", {f"{HEAD}.template.spec.containers": []}, "headGroupSpec should have at least one container"),
    (
        "cluster",
        {f"{HEAD}.resources": {"CPU": "0"}},
        "resource fields should not be set in both rayStartParams and Resources for Head group; please use only one",
    ),
    (
        "cluster",
        {f"{HEAD}.rayStartParams.labels": "a=b"},
        "rayStartParams['labels'] is not supported for Head group; please use the top-level Labels field instead",
    ),
    ("cluster", {f"{W0}.template.spec.containers": []}, "workerGroupSpec should have at least one container"),
    (
        "cluster",
        {"spec.enableInTreeAutoscaling": False, f"{W0}.maxReplicas": DROP},
        MIN_MAX_REQUIRED,
    ),
    ("cluster", {f"{W0}.minReplicas": -1}, "worker group cpu-ingest has negative minReplicas -1"),
    ("cluster", {f"{W0}.maxReplicas": -1}, "worker group cpu-ingest has negative maxReplicas -1"),
    ("cluster", {f"{W1}.minReplicas": 5}, "worker group gpu-h100 has minReplicas 5 greater than maxReplicas 4"),
    (
        "cluster",
        {f"{W0}.rayStartParams.num-cpus": "32", f"{W0}.resources": {"CPU": "32"}},
        "resource fields should not be set in both rayStartParams and Resources for cpu-ingest group; please use "
        "only one",
    ),
    (
        "cluster",
        {f"{W1}.labels": {"gpu": "h100 80gb"}},
        "invalid label value for key 'gpu' in gpu-h100 group: 'h100 80gb', error: ...",
    ),
    ("cluster", {f"{W1}.labels": {"-gpu": "h100"}}, "invalid label key for gpu-h100 group: '-gpu', error: ..."),
    (
        "cluster",
        {f"{W0}.idleTimeoutSeconds": -1},
        "worker group cpu-ingest: idleTimeoutSeconds must be non-negative, got -1",
    ),
    (
        "cluster",
        {f"{W0}.idleTimeoutSeconds": 60},
        "worker group cpu-ingest: idleTimeoutSeconds is set, but autoscaler v2 is not enabled. Please set "
        ".spec.autoscalerOptions.version to 'v2' (or set RAY_enable_autoscaler_v2 environment variable to 'true' in "
        "the head pod if using KubeRay < 1.4.0)",
    ),
    # fault tolerance
    (
        "cluster",
        {**FT, "metadata.annotations": {"ray.io/ft-enabled": "true"}},
        "ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set. Please use only "
        "GcsFaultToleranceOptions to configure GCS fault tolerance",
    ),
    (
        "cluster",
        {HEAD_ENV: [{"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}]},
        "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not "
        "set. Please set GcsFaultToleranceOptions to enable GCS fault tolerance",
    ),
    (
        "cluster",
        {**FT, f"{HEAD}.rayStartParams.redis-password": "x"},
        "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled - use "
        "GcsFaultToleranceOptions.RedisPassword instead",
    ),
    (
        "cluster",
        {**FT, HEAD_ENV: [{"name": "REDIS_PASSWORD", "value": "x"}]},
        "cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is enabled - use "
        "GcsFaultToleranceOptions.RedisPassword instead",
    ),
    (
        "cluster",
        {**FT, HEAD_ENV: [{"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}]},
        "cannot set `RAY_REDIS_ADDRESS` env var in head Pod when GcsFaultToleranceOptions is enabled - use "
        "GcsFaultToleranceOptions.RedisAddress instead",
    ),
    (
        "cluster",
        {**FT, "metadata.annotations": {"ray.io/external-storage-namespace": "ctray"}},
        "cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is enabled - use "
        "GcsFaultToleranceOptions.ExternalStorageNamespace instead",
    ),
    (
        "cluster",
        {HEAD_ENV: [{"name": "REDIS_USERNAME", "value": "x"}]},
        "cannot set redis username in rayStartParams or environment variables - use "
        "GcsFaultToleranceOptions.RedisUsername instead",
    ),
    # the autoscaler
    (
        "cluster",
        {"spec.enableInTreeAutoscaling": False, HEAD_ENV: [{"name": "RAY_enable_autoscaler_v2", "value": "1"}]},
        "environment variable RAY_enable_autoscaler_v2 cannot be set to '1' when enableInTreeAutoscaling is false. "
        "Please set enableInTreeAutoscaling: true to use autoscaler v2",
    ),
    ("cluster", {f"{W0}.suspend": True}, "worker group cpu-ingest cannot be suspended with Autoscaler enabled"),
    (
        "cluster",
        {"spec.autoscalerOptions.version": "v2", HEAD_ENV: [{"name": "RAY_enable_autoscaler_v2", "value": "1"}]},
        "both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set, please only "
        "use the former",
    ),
    (
        "cluster",
        {"spec.autoscalerOptions.version": "v2", f"{HEAD}.template.spec.restartPolicy": "Always"},
        "restartPolicy for head Pod should be Never or unset when using autoscaler V2",
    ),
    (
        "cluster",
        {"spec.autoscalerOptions.version": "v2", f"{W1}.template.spec.restartPolicy": "OnFailure"},
        "restartPolicy for worker group gpu-h100 should be Never or unset when using autoscaler V2",
    ),
    (
        "cluster",
        {"spec.autoscalerOptions.idleTimeoutSeconds": -1},
        "autoscalerOptions.idleTimeoutSeconds must be non-negative, got -1",
    ),
    (
        "cluster",
        {"spec.autoscalerOptions.env": [{"name": "KUBERAY_GEN_AUTOSCALER_START_CMD", "value": "ray"}]},
        "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD: it is managed by KubeRay and "
        "injected automatically into the autoscaler container",
    ),
    # auth and feature gates
    ("cluster", {"spec.historyServerOptions": {}}, "RayClusterHistoryServer feature gate is not enabled"),
    (
        "cluster",
        {"spec.authOptions": {"mode": "token"}, "spec.rayVersion": DROP},
        "authOptions.mode is 'token' but RayVersion was not specified. Ray version 2.52.0 or later is required",
    ),
    (
        "cluster",
        {"spec.authOptions": {"mode": "token"}, "spec.rayVersion": "2.50.0"},
        "authOptions.mode is 'token' but minimum Ray version is 2.52.0, got 2.50.0",
    ),
    (
        "cluster",
        {"spec.authOptions": {"mode": "token"}, "spec.rayVersion": "nightly"},
        "authOptions.mode is 'token' but RayVersion format is invalid: nightly, ...",
    ),
    (
        "cluster",
        {"spec.authOptions": {"mode": "token", "enableK8sTokenAuth": True}, "spec.rayVersion": "2.53.0"},
        "authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0, got 2.53.0",
    ),
    (
        "cluster",
        {"spec.authOptions": {"mode": "token", "enableK8sTokenAuth": True, "secretName": "s"}},
        "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set",
    ),
    (
        "cluster",
        {"spec.authOptions": {"enableK8sTokenAuth": True}},
        "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'",
    ),
    (
        "cluster",
        {"spec.networkPolicy": {}},
        "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to be enabled",
    ),
    ("cluster", {"spec.tlsOptions": {}}, "spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled"),
    # ValidateRayClusterUpgradeOptions
    ("cluster", {"spec.upgradeStrategy": {"type": "Rolling"}}, UPGRADE_TYPE),
    # ValidateRayJobMetadata
    (
        "job",
        {"metadata.name": "j" * 48},
        "The RayJob metadata is invalid: RayJob name should be no more than 47 characters",
    ),
    ("job", {"metadata.name": "ctray_ingest"}, "The RayJob metadata is invalid: RayJob name should be a valid ..."),
    # ValidateRayJobSpec: deletion
    (
        "job",
        {"spec.ttlSecondsAfterFinished": 3600},  # what the RayJobs had
        "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false cannot have "
        "TTLSecondsAfterFinished",
    ),
    (
        "job",
        {"spec.suspend": True},
        "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false is not allowed to be "
        "suspended",
    ),
    (
        "job",
        {"spec.ttlSecondsAfterFinished": -1},
        "The RayJob spec is invalid: TTLSecondsAfterFinished must be a non-negative integer",
    ),
    (
        "job",
        {"spec.deletionStrategy": {}},
        "The RayJob spec is invalid: DeletionStrategy requires either BOTH onSuccess and onFailure, OR the "
        "deletionRules field (cannot be empty)",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"deletionRules": [RULE]}, "spec.shutdownAfterJobFinishes": True},
        "The RayJob spec is invalid: spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are "
        "mutually exclusive",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"deletionRules": [RULE], "onSuccess": {"policy": "DeleteSelf"}}},
        "The RayJob spec is invalid: Cannot use both legacy onSuccess/onFailure fields and deletionRules "
        "simultaneously",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"onSuccess": {"policy": "DeleteSelf"}}},
        "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set when using the legacy deletion "
        "policy fields of DeletionStrategy",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"onSuccess": {}, "onFailure": {"policy": "DeleteNone"}}},
        "the DeletionPolicyType field of DeletionStrategy.OnSuccess cannot be unset when DeletionStrategy is enabled",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}, "onFailure": {"policy": "DeleteNone"}}},
        "the ClusterSelector mode doesn't support DeletionStrategy=DeleteCluster on success",
    ),
    (
        "owned",
        {"spec.deletionStrategy": {"onSuccess": {"policy": "DeleteNone"}, "onFailure": {"policy": "DeleteCluster"}}},
        "The RayJob spec is invalid: shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'",
    ),
    (
        "owned",
        {"spec.deletionStrategy": {"onSuccess": {"policy": "DeleteWorkers"}, "onFailure": {"policy": "DeleteSelf"}}},
        "DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"deletionRules": [{**RULE, "policy": "DeleteCluster"}]}},
        "deletionRules[0]: DeletionPolicyType 'DeleteCluster' not supported when ClusterSelector is set",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"deletionRules": [{"policy": "DeleteSelf", "condition": {"ttlSeconds": 60}}]}},
        "deletionRules[0]: exactly one of JobStatus and JobDeploymentStatus must be set",
    ),
    (
        "job",
        {"spec.deletionStrategy": {"deletionRules": [{**RULE, "condition": {"jobStatus": "FAILED", **FAILED}}]}},
        "deletionRules[0]: cannot set both JobStatus and JobDeploymentStatus at the same time",
    ),
    ("job", {"spec.deletionStrategy": {"deletionRules": [{**RULE, "condition": NEGATIVE_TTL}]}}, NEGATIVE_RULE_TTL),
    (
        "job",
        {"spec.deletionStrategy": {"deletionRules": [RULE, RULE]}},
        "deletionRules[1]: duplicate rule for DeletionPolicyType 'DeleteSelf' and JobStatus 'SUCCEEDED'",
    ),
    (
        "owned",
        {
            "spec.shutdownAfterJobFinishes": False,
            "spec.ttlSecondsAfterFinished": 0,
            "spec.deletionStrategy": {"deletionRules": [{**RULE, "policy": "DeleteWorkers"}]},
        },
        "deletionRules[0]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled",
    ),
    (
        "owned",
        {
            "spec.shutdownAfterJobFinishes": False,
            "spec.ttlSecondsAfterFinished": 0,
            "spec.deletionStrategy": {
                "deletionRules": [
                    {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 600}},
                    {"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}},
                ]
            },
        },
        "for JobStatus 'SUCCEEDED': DeleteSelf TTL (60) must be >= DeleteCluster TTL (600)",
    ),
    # clusterSelector mode and submission
    (
        "job",
        {"spec.suspend": True, "spec.shutdownAfterJobFinishes": True},
        "The RayJob spec is invalid: the ClusterSelector mode doesn't support the suspend operation",
    ),
    (
        "job",
        {"spec.clusterSelector": DROP},
        "The RayJob spec is invalid: one of RayClusterSpec or ClusterSelector must be set",
    ),
    ("job", {"spec.clusterSelector": {"ray.io/cluster": ""}}, "cluster name in ClusterSelector should not be empty"),
    ("job", {"spec.submissionMode": "SidecarMode"}, "ClusterSelector is not supported in SidecarMode"),
    (
        "job",
        {"spec.backoffLimit": 2},
        "The RayJob spec is invalid: BackoffLimit is incompatible with ClusterSelector mode",
    ),
    (
        "owned",
        {"spec.submissionMode": "InteractiveMode", "spec.backoffLimit": 2},
        "The RayJob spec is invalid: BackoffLimit is incompatible with InteractiveMode",
    ),
    (
        "owned",
        {"spec.submissionMode": "SidecarMode", "spec.submitterPodTemplate": {"spec": {"containers": [{"name": "s"}]}}},
        "Currently, SidecarMode doesn't support SubmitterPodTemplate",
    ),
    (
        "owned",
        {"spec.submissionMode": "SidecarMode", "spec.submitterConfig": {"backoffLimit": 1}},
        "Currently, SidecarMode doesn't support SubmitterConfig",
    ),
    (
        "owned",
        {"spec.submissionMode": "SidecarMode", f"{OWNED}.headGroupSpec.template.spec.restartPolicy": "Always"},
        "restartPolicy for head Pod should be Never or unset when using SidecarMode",
    ),
    (
        "owned",
        {f"{OWNED}.authOptions": {"mode": "token", "enableK8sTokenAuth": True}},
        "The RayJob spec is invalid: K8s token auth mode is currently not supported for RayJob",
    ),
    (
        "owned",
        {f"{OWNED}.workerGroupSpecs.1.minReplicas": 5},
        "The RayJob spec is invalid: worker group gpu-h100 has minReplicas 5 greater than maxReplicas 4",
    ),
    ("job", {"spec.runtimeEnvYAML": "env_vars: {CTRAY_BUCKET: [s3"}, "failed to unmarshal RuntimeEnvYAML: ..."),
    ("job", {"spec.runtimeEnvYAML": "CTRAY_BUCKET=s3://b"}, "failed to unmarshal RuntimeEnvYAML: ..."),
    (
        "job",
        {"spec.activeDeadlineSeconds": 0},
        "The RayJob spec is invalid: activeDeadlineSeconds must be a positive integer",
    ),
    ("job", {"spec.preRunningDeadlineSeconds": 0}, PRE_RUNNING_DEADLINE),
    ("job", {"spec.backoffLimit": -1}, "The RayJob spec is invalid: backoffLimit must be a positive integer"),
]


@pytest.mark.parametrize("manifest", sorted(p.name for p in KUBERAY.glob("ray*.yaml")))
def test_kuberay_accepts_the_manifests(manifest):
    assert kuberay_rejects(_load(manifest)) is None


def test_kuberay_accepts_a_job_that_owns_its_cluster():
    """The other way to run the jobs: shutdownAfterJobFinishes is what makes a TTL legal."""
    assert kuberay_rejects(_owned_job()) is None
    assert kuberay_rejects(_mutate(_owned_job(), {"spec.shutdownAfterJobFinishes": False})) == (
        "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false cannot have "
        "TTLSecondsAfterFinished"
    )


@pytest.mark.parametrize(("base", "changes", "message"), BROKEN, ids=[m[:60] for _, _, m in BROKEN])
def test_kuberay_rejects_a_broken_copy_in_its_words(base, changes, message):
    doc = _mutate(BASES[base](), changes)
    # the CRD schema (what kubectl checks) lets all but a few through: only the operator sees them
    if message in ALSO_IN_SCHEMA:
        with pytest.raises(jsonschema.ValidationError):
            CRD[doc["kind"]].validate(doc)
    else:
        CRD[doc["kind"]].validate(doc)
    error = kuberay_rejects(doc)
    assert error is not None
    assert error.startswith(message[:-3]) if message.endswith("...") else error == message


# ---------------------------------------------------------------------------------------------------
# What a pod needs that KubeRay does not check.

EFA = "vpc.amazonaws.com/efa"
# nodeSelector keys a node autoscaler knows before it has created a node of the group: from the instance
# type (Karpenter, cluster-autoscaler's template nodes), the node group / pool's configuration
# (cluster-autoscaler reads EKS managed node groups and GKE node pools), or Karpenter's instance labels.
KNOWN_FROM_ZERO = {
    "node.kubernetes.io/instance-type",
    "karpenter.k8s.aws/instance-gpu-name",
    "karpenter.k8s.aws/instance-family",
    "karpenter.sh/nodepool",
    "eks.amazonaws.com/nodegroup",
    "cloud.google.com/gke-accelerator",
    "cloud.google.com/gke-nodepool",
}
EFA_PER_INSTANCE = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32}
# What cluster/aws.yaml's EFA node types set, less Docker's options: the plugin, which the image carries
# off the library path, loads only from NCCL_NET_PLUGIN; NCCL_NET=OFI fails a job at NCCL's start
# instead of letting it run over TCP when the plugin or EFA is missing.
EFA_ENV = {
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",
    "FI_EFA_FORK_SAFE": "1",
    "NCCL_NET_PLUGIN": efa_plugin((REPO / "cluster" / "Dockerfile").read_text()),
    "NCCL_NET": "OFI",
}
_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(q: str | int) -> float:
    """A Kubernetes quantity ("1600Gi", "500M", 8) in its base unit."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert match and match[2] in _UNITS, q
    return float(match[1]) * _UNITS[match[2]]


def _groups(cluster: Doc) -> list[tuple[str, Doc]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def gpu_group_problems(group: Doc) -> list[str]:
    """Why a GPU group's pods would not get a node from zero, or would run NCCL without EFA."""
    pod = group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    if "nvidia.com/gpu" not in resources.get("limits", {}):
        return []
    selector, problems = pod.get("nodeSelector") or {}, []
    problems += [f"nodeSelector {k}: no node has it until one runs" for k in selector if k not in KNOWN_FROM_ZERO]
    efa = resources.get("limits", {}).get(EFA)
    if efa != resources.get("requests", {}).get(EFA):
        problems.append(f"{EFA}: limits {efa} != requests {resources.get('requests', {}).get(EFA)}")
    env = _env(pod["containers"][0])
    if efa is None:
        # NCCL_NET=OFI with no EFA device (a GKE node, or the request dropped) fails every job's NCCL
        return problems + [f"{k}={env[k]} without {EFA}" for k in ("NCCL_NET", "FI_PROVIDER") if k in env]
    problems += [f"EFA without {k}={v}" for k, v in EFA_ENV.items() if env.get(k) != v]
    if not env.get("NCCL_SOCKET_IFNAME"):
        problems.append("EFA without NCCL_SOCKET_IFNAME")
    instance = selector.get("node.kubernetes.io/instance-type")
    if instance is not None and EFA_PER_INSTANCE.get(instance) != int(efa):
        problems.append(f"{instance} has {EFA_PER_INSTANCE.get(instance)} EFA devices, not {efa}")
    if any(k.startswith("cloud.google.com/") for k in selector):
        problems.append("EFA on a GKE node: the pod would never schedule")
    return problems


def shm_problems(group: Doc) -> list[str]:
    """Why Ray's default object store would not fit this group's /dev/shm, or /dev/shm not the pod."""
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    mount = next((m for m in container.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"), None)
    volume: Doc = next((v for v in pod.get("volumes") or [] if mount and v["name"] == mount["name"]), {})
    empty_dir = volume.get("emptyDir") or {}
    if empty_dir.get("medium") != "Memory" or "sizeLimit" not in empty_dir:
        return ["no memory-backed /dev/shm with a sizeLimit"]
    size, memory = _quantity(empty_dir["sizeLimit"]), _quantity(container["resources"]["limits"]["memory"])
    # ray._private.utils.resolve_object_store_memory, on a node of `memory`; it shrinks the store to 95% of /dev/shm
    store = _quantity((group.get("rayStartParams") or {}).get("object-store-memory", 0)) or min(
        memory * ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION,
        ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES,
    )
    problems = [] if size <= memory else [f"/dev/shm {empty_dir['sizeLimit']} > memory limit"]
    if store > 0.95 * size:
        problems.append(f"/dev/shm {empty_dir['sizeLimit']} < Ray's object store {store / 2**30:.1f}Gi / 0.95")
    return problems


def test_every_pod_has_a_dev_shm_for_the_object_store():
    cluster = _load("raycluster.yaml")
    assert {name: shm_problems(g) for name, g in _groups(cluster)} == {name: [] for name, _ in _groups(cluster)}


@pytest.mark.parametrize(
    "changes",
    [
        {f"{HEAD}.template.spec.containers.0.volumeMounts": DROP},
        {f"{W0}.template.spec.volumes.0.emptyDir.medium": ""},
        {f"{W0}.template.spec.volumes.0.emptyDir.sizeLimit": "129Gi"},  # over the container's 128Gi
        {f"{W1}.template.spec.volumes.0.emptyDir.sizeLimit": "64Gi"},  # what the GPU group had
        {f"{W0}.rayStartParams.object-store-memory": str(60 * 2**30)},
    ],
    ids=["no-mount", "on-disk", "over-memory", "gpu-64Gi", "object-store-memory"],
)
def test_a_dev_shm_that_does_not_fit_is_caught(changes):
    assert any(shm_problems(g) for _, g in _groups(_mutate(_load("raycluster.yaml"), changes)))


def test_gpu_groups_scale_from_zero_with_efa():
    groups = _load("raycluster.yaml")["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and {g["groupName"]: gpu_group_problems(g) for g in gpu} == {g["groupName"]: [] for g in gpu}


RES = f"{W1}.template.spec.containers.0.resources"
ENV = f"{W1}.template.spec.containers.0.env"


def _gpu_env(name: str, value: str | None) -> list[Doc]:
    """The GPU group's env with `name` set to `value`, or left out (None)."""
    env = _load("raycluster.yaml")["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == name for e in env), name
    return [e | {"value": value} if e["name"] == name else e for e in env if e["name"] != name or value is not None]


GPU_NODE = {"cpu": "176", "memory": "1600Gi", "nvidia.com/gpu": "8"}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {f"{W1}.template.spec.nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "nodeSelector nvidia.com/gpu.product: no node has it until one runs",
        ),
        ({f"{RES}.limits": GPU_NODE | {EFA: "4"}, f"{RES}.requests": GPU_NODE | {EFA: "4"}}, "p5.48xlarge has 32 EFA"),
        ({f"{RES}.requests": GPU_NODE}, f"{EFA}: limits 32 != requests None"),
        ({f"{W1}.template.spec.containers.0.env": []}, "EFA without FI_PROVIDER=efa"),
        ({ENV: _gpu_env("NCCL_NET_PLUGIN", None)}, f"EFA without NCCL_NET_PLUGIN={EFA_ENV['NCCL_NET_PLUGIN']}"),
        ({ENV: _gpu_env("NCCL_NET_PLUGIN", "/usr/lib/libnccl-net.so")}, "EFA without NCCL_NET_PLUGIN="),
        ({ENV: _gpu_env("NCCL_NET", None)}, "EFA without NCCL_NET=OFI"),
        ({ENV: _gpu_env("NCCL_NET", "Socket")}, "EFA without NCCL_NET=OFI"),
        ({ENV: _gpu_env("NCCL_SOCKET_IFNAME", None)}, "EFA without NCCL_SOCKET_IFNAME"),
        ({f"{RES}.limits": GPU_NODE, f"{RES}.requests": GPU_NODE}, f"NCCL_NET=OFI without {EFA}"),
        (
            {f"{W1}.template.spec.nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}},
            "EFA on a GKE node: the pod would never schedule",
        ),
    ],
    ids=[
        "gfd-label",
        "efa-count",
        "efa-limits-only",
        "efa-env",
        "no-nccl-plugin",
        "other-nccl-plugin",
        "no-nccl-net",
        "socket-nccl-net",
        "no-socket-ifname",
        "ofi-without-efa",
        "efa-on-gke",
    ],
)
def test_a_gpu_group_that_would_not_schedule_or_use_efa_is_caught(changes, problem):
    group = _mutate(_load("raycluster.yaml"), changes)["spec"]["workerGroupSpecs"][1]
    assert any(p.startswith(problem) for p in gpu_group_problems(group)), gpu_group_problems(group)
