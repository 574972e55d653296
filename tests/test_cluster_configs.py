"""The cluster configs as the tools that read them would: Ray's launcher schema for cluster/aws.yaml
and cluster/gcp.yaml (after Ray's own prepare_config), the KubeRay CRDs' schemas for the
manifests, and the versions that must agree between the image, the cluster and the client."""

import json
import re

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

from ctray.config import StorageConfig, load_config
from ctray.errors import ConfigError
from ctray.ingest.config import IngestConfig
from ctray.storage import filesystem
from ctray.train.config import PretrainConfig
from ctray.tune.config import SweepConfig

from conftest import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"


def _strict(schema):
    """A CRD schema in which fields it does not declare are errors (`kubectl apply --validate=strict`);
    the API server would otherwise drop them silently, and a typo would do nothing."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd(name: str) -> dict:
    return json.loads((KUBERAY / "crds" / f"{name}.v1.json").read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_rays_own_checks(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {
        "CPU": 0
    }  # drivers only: work lands on workers, where it scales
    assert config["docker"]["image"].endswith(":0.2.0") and not config["setup_commands"]
    gpus = {t: spec["resources"].get("GPU", 0) for t, spec in types.items()}
    assert any(gpus.values()) and any(
        spec["resources"].get("GPU", 0) == 0 and spec["resources"].get("CPU", 0) > 0 for spec in types.values()
    )
    images = {
        str(spec["node_config"].get("ImageId") or spec["node_config"]["disks"][0]["initializeParams"]["sourceImage"])
        for spec in types.values()
    }
    assert not any("latest_dlami" in i for i in images)  # Ubuntu 18.04 / CUDA 11.2 in Ray 2.60

    # Every GPU job fits: one worker's bundle on a node type, all its workers in the cluster's GPUs.
    for job in ("ctfm.yaml", "cagcl.yaml", "totalfm-mae.yaml", "totalfm-clip.yaml"):
        cfg = load_config(
            PretrainConfig,
            REPO / "jobs" / job,
            ["data.shards=s3://b/s", "run.storage=s3://b/r", "objective.init_from=null"]
            if job == "totalfm-clip.yaml"
            else ["data.shards=s3://b/s", "run.storage=s3://b/r"],
        )
        fits = [
            t
            for t, spec in types.items()
            if spec["resources"].get("GPU", 0) >= 1 and spec["resources"].get("CPU", 0) >= cfg.scaling.cpus_per_worker
        ]
        assert fits, job
        assert cfg.scaling.num_workers <= sum(gpus[t] * types[t]["max_workers"] for t in fits), job


def test_aws_iam_policies_grant_what_the_autoscaler_and_jobs_use():
    head = json.loads((CLUSTER / "aws-iam-head.json").read_text())
    worker = json.loads((CLUSTER / "aws-iam-worker.json").read_text())
    head_actions = {a for s in head["Statement"] for a in s["Action"]}
    assert {
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:CreateTags",
        "ec2:DescribeInstances",
        "iam:PassRole",
    } <= head_actions
    for policy in (head, worker):
        actions = {a for s in policy["Statement"] for a in s["Action"]}
        assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"} <= actions
        assert policy["Version"] == "2012-10-17"


@pytest.mark.parametrize("manifest", sorted(p.name for p in KUBERAY.glob("ray*.yaml")))
def test_kuberay_manifests_match_the_crds(manifest):
    doc = yaml.safe_load((KUBERAY / manifest).read_text())
    crd = _crd({"RayCluster": "rayclusters", "RayJob": "rayjobs"}[doc["kind"]])
    assert doc["apiVersion"] == crd["apiVersion"]
    jsonschema.validate(doc, _strict(crd["openAPIV3Schema"]))


def test_kuberay_pieces_fit_together(monkeypatch):
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    account = yaml.safe_load((KUBERAY / "serviceaccount.yaml").read_text())
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert {g["template"]["spec"]["serviceAccountName"] for g in groups} == {account["metadata"]["name"]}
    gpu = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu and all(g["template"]["spec"]["nodeSelector"] and g["template"]["spec"]["tolerations"] for g in gpu)
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in spec["workerGroupSpecs"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for path in sorted(KUBERAY.glob("rayjob-*.yaml")):
        job = yaml.safe_load(path.read_text())["spec"]
        assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
        command, config = job["entrypoint"].split()[1:3]
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        model = {"sweep": SweepConfig, "pretrain": PretrainConfig, "ingest": IngestConfig}[command]
        loaded = load_config(model, config)  # jobs/<name>.yaml: on the head, the image's bundled copy
        assert "s3://my-bucket" in json.dumps(loaded.model_dump(mode="json")), path.name


def test_versions_agree_between_image_cluster_and_client():
    """Ray refuses a client or driver whose Ray or Python version is not the cluster's."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"ARG BASE=rayproject/ray:(\S+)", dockerfile).group(1)
    pins = {
        Requirement(line).name.lower(): Requirement(line)
        for line in (CLUSTER / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    ray_pin = next(iter(pins["ray"].specifier)).version
    assert base.startswith(f"{ray_pin}-py311-cu12") and ray_pin == ray.__version__
    for path in [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml", KUBERAY / "raycluster.yaml"]:
        assert "ray[default]==" + ray_pin in path.read_text() or ray_pin in path.read_text(), path.name
    # every dependency of ctray (and of `ray up`) has a pin in the constraints, inside its range
    import importlib.metadata as md

    for dep in md.distribution("ctray").requires:
        req = Requirement(dep)
        if req.marker is not None and not req.marker.evaluate({"extra": "launcher"}):
            continue
        pin = pins.get(req.name.lower().replace("_", "-")) or pins.get(req.name.lower())
        assert pin is not None, f"{req.name} is not pinned in cluster/constraints.txt"
        assert req.specifier.contains(next(iter(pin.specifier)).version, prereleases=True), (str(req), str(pin))


def test_object_store_schemes():
    """gs:// works (gcsfs is a dependency); a scheme without its package is one line, not an ImportError."""
    import fsspec

    # (instantiating it would look for Google credentials, with timeouts off Google Cloud)
    assert fsspec.get_filesystem_class("gs").__module__.startswith("gcsfs")
    with pytest.raises(ConfigError, match=r"no filesystem for az:// URIs .*adlfs"):
        filesystem("az://container/x", StorageConfig())
