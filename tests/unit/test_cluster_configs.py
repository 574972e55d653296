"""The cluster configs as the tools that read them would: Ray's launcher schema for cluster/aws.yaml
and cluster/gcp.yaml (after Ray's own prepare_config), the KubeRay CRDs' schemas for the
manifests, and the versions that must agree between the image, the cluster and the client.

Then what no schema checks but a real cluster needs: nodes that log in to the image's registry before
they pull it, a torch whose CUDA the nodes' driver runs (cluster/Dockerfile fails its build otherwise),
and GPU networking: EFA on every network card of AWS's p4d/p5 with NCCL pointed at it, NCCL's socket
tuning on Google Cloud. Each check is a function that lists what is wrong, so a broken copy of a
config can show that the check catches it."""

import copy
import json
import re
import sys
from types import SimpleNamespace
from typing import Any

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

from helpers import REPO, efa_plugin

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
            ["data.shards=s3://b/s", "eval.shards=s3://b/v", "run.storage=s3://b/r", "objective.init_from=null"]
            if job == "totalfm-clip.yaml"
            else ["data.shards=s3://b/s", "eval.shards=s3://b/v", "run.storage=s3://b/r"],
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
        actions = {a for s in policy["Statement"] if s["Effect"] == "Allow" for a in s["Action"]}
        assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"} <= actions
        assert policy["Version"] == "2012-10-17"
    # The pseudonym maps are the driver's (the head's): workers may neither read nor write them.
    denied = [s for s in worker["Statement"] if s["Effect"] == "Deny"]
    assert any(
        "s3:GetObject" in s["Action"] and "arn:aws:s3:::my-bucket/*.id_map.jsonl" in s["Resource"] for s in denied
    )
    assert not [s for s in head["Statement"] if s["Effect"] == "Deny"]


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
    assert base.startswith(f"{ray_pin}-py311-cu") and ray_pin == ray.__version__
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


# ---------------------------------------------------------------------------------------------------
# What a real cluster needs beyond the schemas.

DOCKERFILE = CLUSTER / "Dockerfile"
DROP = object()  # _mutate: remove the key


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _mutate(doc: dict, changes: dict[str, Any]) -> dict:
    """A deep copy of `doc` with each dotted path (list items by index) set to its value, or removed."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key_: Any = int(last) if isinstance(node, list) else last
        if value is DROP:
            del node[key_]
        else:
            node[key_] = value
    return doc


def _dockerfile_arg(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)", text, re.MULTILINE)
    assert match, f"cluster/Dockerfile has no ARG {name}"
    return match.group(1)


def _dockerfile_runs(text: str) -> list[str]:
    """The Dockerfile's RUN instructions, each as one line (continuations joined)."""
    joined = re.sub(r"\\\n", " ", text)
    return [line[len("RUN ") :] for line in joined.splitlines() if line.startswith("RUN ")]


def _container(config: dict, node_type: str) -> tuple[list[str], dict[str, str]]:
    """The `docker run` options Ray's launcher gives a worker of this type, and the environment they set:
    the global run_options, then the type's worker_run_options in place of the global ones."""
    docker = config["docker"]
    own = config["available_node_types"][node_type].get("docker", {})
    options = [*docker.get("run_options", []), *own.get("worker_run_options", docker.get("worker_run_options", []))]
    env = {}
    for option in options:
        match = re.fullmatch(r"(?:--env|-e)[ =](\w+)=(\S*)", option)
        if match:
            env[match.group(1)] = match.group(2)
    return options, env


# Registry login: Ray pulls docker.image on each node's host right after initialization_commands.


def _logs_in(command: str, registry: str) -> bool:
    ecr = re.fullmatch(r"(?:\d{12}|<account>)\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com", registry)
    if ecr:
        login = re.search(
            r"aws ecr get-login-password --region (\S+) \| docker login --username AWS --password-stdin (\S+)", command
        )
        return bool(login) and login.group(1) == ecr.group(1) and login.group(2) == registry
    helper = re.search(r"gcloud auth configure-docker (\S+)", command)
    return bool(helper) and registry in helper.group(1).split(",")


def login_problems(config: dict) -> list[str]:
    registry = config["docker"]["image"].split("/")[0]
    problems = []
    for name, spec in config["available_node_types"].items():
        # a node type's own initialization_commands replace the global ones (Ray's launcher)
        commands = spec.get("initialization_commands", config.get("initialization_commands", []))
        if not any(_logs_in(command, registry) for command in commands):
            problems.append(f"{name}: no login to {registry} before the pull")
    return problems


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_every_node_logs_in_to_the_images_registry(name):
    assert login_problems(_launcher(name)) == []


@pytest.mark.parametrize(
    ("name", "changes", "problem"),
    [
        (
            "aws.yaml",
            {"docker.image": "<account>.dkr.ecr.eu-west-1.amazonaws.com/ctray:0.2.0"},
            "head: no login to <account>.dkr.ecr.eu-west-1.amazonaws.com",
        ),
        ("aws.yaml", {"initialization_commands": DROP}, "gpu_h100: no login"),
        ("aws.yaml", {"available_node_types.gpu_a100.initialization_commands": ["nvidia-smi"]}, "gpu_a100: no login"),
        ("gcp.yaml", {"docker.image": "europe-docker.pkg.dev/<project>/ctray/ctray:0.2.0"}, "cpu_ingest: no login"),
    ],
    ids=["ecr-region", "no-commands", "type-overrides", "ar-location"],
)
def test_a_node_that_cannot_pull_is_caught(name, changes, problem):
    assert any(p.startswith(problem) for p in login_problems(_mutate(_launcher(name), changes)))


def test_aws_roles_are_for_ec2_and_the_head_hands_out_the_workers_profile():
    trust = json.loads((CLUSTER / "aws-ec2-trust.json").read_text())
    assert trust["Version"] == "2012-10-17"
    assert [(s["Effect"], s["Principal"], s["Action"]) for s in trust["Statement"]] == [
        ("Allow", {"Service": "ec2.amazonaws.com"}, "sts:AssumeRole")
    ]
    config = _launcher("aws.yaml")
    types = config["available_node_types"]
    profiles = {t: spec["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for t, spec in types.items()}
    head = json.loads((CLUSTER / "aws-iam-head.json").read_text())
    passed = {r for s in head["Statement"] if "iam:PassRole" in s["Action"] for r in s["Resource"]}
    for node_type, profile in profiles.items():
        if node_type != config["head_node_type"]:
            assert f"arn:aws:iam::<account>:instance-profile/{profile}" in passed, node_type
            assert f"arn:aws:iam::<account>:role/{profile}" in passed, node_type  # role named as its profile


# CUDA: torch's build, the base image and the nodes' NVIDIA driver.

# The oldest Linux driver each CUDA major runs on (CUDA's minor-version compatibility).
MIN_DRIVER = {12: 525, 13: 580}
DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def _pins(constraints: str) -> dict[str, str]:
    reqs = [Requirement(line) for line in constraints.splitlines() if line and not line.startswith("#")]
    return {r.name.lower().replace("_", "-"): next(iter(r.specifier)).version for r in reqs}


def cuda_problems(dockerfile: str, constraints: str, aws: dict, gcp: dict) -> list[str]:
    major = int(_dockerfile_arg(dockerfile, "CUDA_MAJOR"))
    problems = []
    base = re.search(r"-cu(\d+)(\d)$", _dockerfile_arg(dockerfile, "BASE"))
    if not base or int(base.group(1)) != major:
        problems.append(f"base image {_dockerfile_arg(dockerfile, 'BASE')} is not CUDA {major}")
    pins = _pins(constraints)
    if "torch" not in pins or "triton" not in pins or pins.get("cuda-toolkit", "").split(".")[0] != str(major):
        problems.append(f"constraints do not pin torch's CUDA {major} closure (torch, triton, cuda-toolkit)")
    problems += [f"constraints pin {n}, not CUDA {major}" for n in pins if re.search(rf"-cu(?!{major}$)\d+$", n)]
    for spec in gcp["available_node_types"].values():
        image = spec["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        driver = re.search(r"-nvidia-(\d+)", image)
        if not driver or int(driver.group(1)) < MIN_DRIVER[major]:
            problems.append(f"{image}: not NVIDIA driver {MIN_DRIVER[major]}+ for CUDA {major}")
    # the current Base OSS DLAMI has had driver 580+ since late 2025; a pinned AMI id could be older
    problems += [
        f"{t}: {spec['node_config']['ImageId']} is not the current Base OSS DLAMI"
        for t, spec in aws["available_node_types"].items()
        if spec["node_config"]["ImageId"] != DLAMI
    ]
    return problems


def _cuda_inputs() -> tuple[str, str, dict, dict]:
    return (
        DOCKERFILE.read_text(),
        (CLUSTER / "constraints.txt").read_text(),
        _launcher("aws.yaml"),
        _launcher("gcp.yaml"),
    )


def test_the_image_the_constraints_and_the_nodes_agree_on_cuda():
    assert cuda_problems(*_cuda_inputs()) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d, c, a, g: (d.replace("-cu130", "-cu128"), c, a, g), "base image rayproject/ray:2.60.0-py311-cu128"),
        (lambda d, c, a, g: (d.replace("CUDA_MAJOR=13", "CUDA_MAJOR=12"), c, a, g), "constraints pin nvidia-nccl-cu13"),
        (lambda d, c, a, g: (d, re.sub(r"(?m)^cuda-toolkit==.*\n", "", c), a, g), "constraints do not pin"),
        (
            lambda d, c, a, g: (d, c, a, json.loads(json.dumps(g).replace("nvidia-580", "nvidia-570"))),
            "projects/deeplearning-platform-release/global/images/family/common-cu129-ubuntu-2204-nvidia-570",
        ),
        (
            lambda d, c, a, g: (d, c, _mutate(a, {"available_node_types.gpu_h100.node_config.ImageId": "ami-0"}), g),
            "gpu_h100: ami-0",
        ),
    ],
    ids=["base-cu12", "major-12", "no-cuda-pins", "driver-570", "pinned-ami"],
)
def test_a_cuda_mismatch_is_caught(edit, problem):
    assert any(p.startswith(problem) for p in cuda_problems(*edit(*_cuda_inputs())))


def _cuda_checks(dockerfile: str) -> list[str]:
    """The build's `python -c` checks of torch's CUDA, with the build's CUDA_MAJOR substituted."""
    major = _dockerfile_arg(dockerfile, "CUDA_MAJOR")
    snippets = re.findall(r'python -c "([^"]*torch\.version\.cuda[^"]*)"', dockerfile)
    return [s.replace("${CUDA_MAJOR}", major) for s in snippets]


@pytest.mark.parametrize(("cuda", "passes"), [("13.0", True), ("13.2", True), ("12.8", False), (None, False)], ids=str)
def test_the_build_fails_unless_torch_is_a_cuda_build_of_its_major(monkeypatch, cuda, passes):
    checks = _cuda_checks(DOCKERFILE.read_text())
    assert len(checks) == 2  # after the install, and after the SEGMENT layer's
    fake = SimpleNamespace(__version__="2.13.0", version=SimpleNamespace(cuda=cuda))
    for module in ("torch", "torchvision", "totalsegmentator"):
        monkeypatch.setitem(sys.modules, module, fake)
    for check in checks:
        if passes:
            exec(check, {})
        else:
            with pytest.raises(AssertionError, match="is not a CUDA 13 build"):
                exec(check, {})


def install_problems(dockerfile: str) -> list[str]:
    """Every pip install in the image is under cluster/constraints.txt, and each RUN that installs ends by
    recording what is installed in /opt/ctray/constraints-cuda.txt (the SEGMENT layer's constraints)."""
    problems = []
    runs = _dockerfile_runs(dockerfile)
    for i, run in enumerate(runs):
        installs = [m.start() for m in re.finditer(r"pip install ", run)]
        for start in installs:
            command = re.split(r";|&&", run[start:])[0]
            if "-c cluster/constraints.txt" not in command:
                problems.append(f"RUN {i}: {command.strip()} without -c cluster/constraints.txt")
        record = run.rfind("--format=freeze --exclude ctray > /opt/ctray/constraints-cuda.txt")
        if installs and record < installs[-1]:
            problems.append(f"RUN {i}: installs without recording /opt/ctray/constraints-cuda.txt after")
    if not any("-c /opt/ctray/constraints-cuda.txt" in run and "[segment]" in run for run in runs):
        problems.append("the SEGMENT layer is not held to what the image installed before it")
    return problems


def test_every_install_in_the_image_is_constrained_and_recorded():
    assert install_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            '-c cluster/constraints.txt -c /opt/ctray/constraints-cuda.txt ".[segment]"',
            '".[segment]"',
            'pip install --no-cache-dir ".[segment]" without',
        ),
        ('-c /opt/ctray/constraints-cuda.txt ".[segment]"', '".[segment]"', "the SEGMENT layer is not held"),
        ('-c cluster/constraints.txt ".[launcher]"', '".[launcher]"', '".[launcher]" without'),
        ("pip list --format=freeze --exclude ctray > /opt/ctray/constraints-cuda.txt; \\\n    fi", "fi", "RUN 2"),
    ],
    ids=["segment-unconstrained", "segment-free-to-move", "launcher-unconstrained", "segment-unrecorded"],
)
def test_an_unconstrained_or_unrecorded_install_is_caught(old, new, problem):
    text = DOCKERFILE.read_text()
    assert old in text
    assert any(problem in p for p in install_problems(text.replace(old, new)))


# GPU networking on AWS: EFA on p4d and p5.

# EC2's maximumEfaInterfaces (aws ec2 describe-instance-types): one per network card.
EFA_INTERFACES = {"p4d.24xlarge": 4, "p5.48xlarge": 32}
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1", "NCCL_NET": "OFI"}


def _interface_problems(name: str, node_config: dict) -> list[str]:
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    nics = node_config.get("NetworkInterfaces", [])
    want = EFA_INTERFACES[node_config["InstanceType"]]
    efa = [n for n in nics if n.get("InterfaceType") == "efa"]
    problems = []
    if len(efa) != want:
        problems.append(f"{name}: {node_config['InstanceType']} has {want} EFA devices, {len(efa)} EFA interfaces")
    if sorted(n.get("NetworkCardIndex") for n in nics) != list(range(len(nics))):
        problems.append(f"{name}: network cards not 0..{len(nics) - 1} once each")
    if any(n.get("DeviceIndex") != min(n.get("NetworkCardIndex"), 1) for n in nics):
        problems.append(f"{name}: card 0's interface must be device 0 (the primary), the others device 1")
    if not all(n.get("DeleteOnTermination") for n in nics):
        problems.append(f"{name}: interfaces outlive the instance")
    try:  # the launcher's own check, on `ray up`
        _configure_subnets_and_groups_from_network_interfaces(node_config)
    except ValueError as e:
        problems.append(f"{name}: {e}")
    if not node_config.get("Placement", {}).get("GroupName"):
        problems.append(f"{name}: no cluster placement group")
    return problems


def _efa_container_problems(name: str, config: dict, plugin: str) -> list[str]:
    options, env = _container(config, name)
    problems = []
    if "--device=/dev/infiniband" not in options:
        problems.append(f"{name}: the container does not get /dev/infiniband")
    if not any(re.fullmatch(r"--ulimit[ =]memlock=-1(:-1)?", o) for o in options):
        problems.append(f"{name}: memlock is limited in the container")
    problems += [f"{name}: {k}={env.get(k)}, not {v}" for k, v in EFA_ENV.items() if env.get(k) != v]
    if env.get("NCCL_NET_PLUGIN") != plugin:
        problems.append(f"{name}: NCCL_NET_PLUGIN={env.get('NCCL_NET_PLUGIN')}, not the image's {plugin}")
    if not env.get("NCCL_SOCKET_IFNAME"):
        problems.append(f"{name}: no NCCL_SOCKET_IFNAME")
    return problems


def _network_of(node_config: dict) -> tuple[set, set]:
    nics = node_config.get("NetworkInterfaces")
    if nics:
        return {n.get("SubnetId") for n in nics}, {tuple(n.get("Groups", [])) for n in nics}
    return set(node_config.get("SubnetIds", [])), {tuple(node_config.get("SecurityGroupIds", []))}


def efa_problems(config: dict, dockerfile: str) -> list[str]:
    types = config["available_node_types"]
    head = _network_of(types[config["head_node_type"]]["node_config"])
    problems = []
    for name, spec in types.items():
        # EFA's traffic stays in one subnet and a group open to itself; Ray's between the head and workers
        if _network_of(spec["node_config"]) != head:
            problems.append(f"{name}: not in the head's subnet and security group")
        if spec["node_config"]["InstanceType"] in EFA_INTERFACES:
            problems += _interface_problems(name, spec["node_config"])
            problems += _efa_container_problems(name, config, efa_plugin(dockerfile))
    return problems


def test_aws_gpu_nodes_run_nccl_over_efa():
    config = _launcher("aws.yaml")
    assert {spec["node_config"]["InstanceType"] for spec in config["available_node_types"].values()} >= set(
        EFA_INTERFACES
    )
    assert efa_problems(config, DOCKERFILE.read_text()) == []


H100 = "available_node_types.gpu_h100"
A100 = "available_node_types.gpu_a100"


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({f"{H100}.node_config.NetworkInterfaces.31": DROP}, "gpu_h100: p5.48xlarge has 32 EFA devices, 31"),
        ({f"{A100}.node_config.NetworkInterfaces.2.InterfaceType": "interface"}, "gpu_a100: p4d.24xlarge has 4"),
        ({f"{A100}.node_config.NetworkInterfaces.3.NetworkCardIndex": 1}, "gpu_a100: network cards"),
        ({f"{H100}.node_config.NetworkInterfaces.0.DeviceIndex": 1}, "gpu_h100: card 0's interface"),
        ({f"{H100}.node_config.SubnetIds": ["<subnet>"]}, "gpu_h100: If NetworkInterfaces are defined"),
        ({f"{A100}.node_config.Placement": DROP}, "gpu_a100: no cluster placement group"),
        ({f"{A100}.docker": DROP}, "gpu_a100: the container does not get /dev/infiniband"),
        ({f"{H100}.docker.worker_run_options.2": "--env FI_PROVIDER=tcp"}, "gpu_h100: FI_PROVIDER=tcp, not efa"),
        ({f"{H100}.docker.worker_run_options.5": "--env X=1"}, "gpu_h100: NCCL_NET_PLUGIN=None"),
        ({"available_node_types.cpu_ingest.node_config.SecurityGroupIds": ["sg-1"]}, "cpu_ingest: not in the head's"),
    ],
    ids=[
        "p5-31-efa",
        "p4d-ena",
        "card-twice",
        "primary-device",
        "subnet-twice",
        "no-placement",
        "no-container-options",
        "tcp-provider",
        "no-plugin",
        "other-group",
    ],
)
def test_a_gpu_node_without_efa_is_caught(changes, problem):
    config = _mutate(_launcher("aws.yaml"), changes)
    assert any(p.startswith(problem) for p in efa_problems(config, DOCKERFILE.read_text()))


# GPU networking on Google Cloud: NCCL's sockets over every NIC of the machine type.

GCP_NICS = {"a3-highgpu-8g": 5, "a2-highgpu-8g": 1}  # a3: the primary and 4 GPU NICs
GPU_NET_1 = "projects/<project>/regions/us-central1/subnetworks/ctray-gpu-1"


def _gcp_gpu_problems(name: str, config: dict) -> list[str]:
    node_config = config["available_node_types"][name]["node_config"]
    nics = node_config["networkInterfaces"]
    problems = []
    if len(nics) != GCP_NICS[node_config["machineType"]] or any(n.get("nicType") != "GVNIC" for n in nics):
        problems.append(f"{name}: {node_config['machineType']} takes {GCP_NICS[node_config['machineType']]} gVNICs")
    if len({n["subnetwork"] for n in nics}) != len(nics):
        problems.append(f"{name}: two NICs on one network")
    if node_config.get("scheduling") != {"onHostMaintenance": "TERMINATE"}:
        problems.append(f"{name}: scheduling must be the object {{onHostMaintenance: TERMINATE}}")
    _, env = _container(config, name)
    threads, socks = env.get("NCCL_SOCKET_NTHREADS"), env.get("NCCL_NSOCKS_PERTHREAD")
    # NCCL's defaults give a peer one or two TCP streams, far from a 100 Gbps NIC; NCCL caps the product at 64
    if not (threads and socks and int(threads) * int(socks) <= 64):
        problems.append(f"{name}: NCCL_SOCKET_NTHREADS={threads} x NCCL_NSOCKS_PERTHREAD={socks}")
    if not env.get("NCCL_SOCKET_IFNAME"):
        problems.append(f"{name}: no NCCL_SOCKET_IFNAME")
    if len(nics) > 1 and env.get("NCCL_CROSS_NIC") != "0":
        problems.append(f"{name}: NCCL_CROSS_NIC=0 keeps each NIC's traffic on its own network")
    return problems


def gcp_network_problems(config: dict) -> list[str]:
    types = config["available_node_types"]
    head_nic = types[config["head_node_type"]]["node_config"]["networkInterfaces"][0]["subnetwork"]
    problems = []
    for name, spec in types.items():
        nics = spec["node_config"].get("networkInterfaces")
        if not nics or nics[0]["subnetwork"] != head_nic:
            problems.append(f"{name}: primary NIC not on the head's subnetwork")
        elif spec["resources"].get("GPU"):
            problems += _gcp_gpu_problems(name, config)
    return problems


def test_gcp_gpu_nodes_tune_nccl_for_their_nics():
    assert gcp_network_problems(_launcher("gcp.yaml")) == []


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {f"{H100}.docker.worker_run_options.2": "--env X=1"},
            "gpu_h100: NCCL_SOCKET_NTHREADS=4 x NCCL_NSOCKS_PERTHREAD=No",
        ),
        ({f"{A100}.docker.worker_run_options.1": "--env NCCL_SOCKET_NTHREADS=32"}, "gpu_a100: NCCL_SOCKET_NTHREADS=32"),
        ({f"{H100}.docker.worker_run_options.3": "--env X=1"}, "gpu_h100: NCCL_CROSS_NIC=0"),
        ({f"{H100}.node_config.networkInterfaces.4": DROP}, "gpu_h100: a3-highgpu-8g takes 5 gVNICs"),
        ({f"{H100}.node_config.networkInterfaces.2.subnetwork": GPU_NET_1}, "gpu_h100: two NICs on one"),
        ({f"{A100}.node_config.scheduling": [{"onHostMaintenance": "TERMINATE"}]}, "gpu_a100: scheduling"),
        ({"available_node_types.cpu_ingest.node_config.networkInterfaces": DROP}, "cpu_ingest: primary NIC"),
    ],
    ids=["one-socket", "over-cap", "cross-nic", "a3-four-nics", "shared-network", "scheduling-list", "ray-picks"],
)
def test_a_gcp_gpu_node_on_untuned_sockets_is_caught(changes, problem):
    config = _mutate(_launcher("gcp.yaml"), changes)
    assert any(p.startswith(problem) for p in gcp_network_problems(config))


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "128Gi", "8") as a number."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _node_types() -> dict[str, dict[str, dict[str, float]]]:
    """Each cluster's worker node types as its autoscaler sees them: the launchers' `resources`
    (memory: AWS's launcher fills it in from the instance type, so it is taken as there; GCP's does
    not), and KubeRay's groups from their containers' limits."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("aws.yaml", "gcp.yaml"):
        config = _launcher(name)
        out[name] = {
            t: {**({"memory": float("inf")} if name == "aws.yaml" else {}), **spec["resources"]}
            for t, spec in config["available_node_types"].items()
            if t != config["head_node_type"]
        }
    spec = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())["spec"]
    out["raycluster.yaml"] = {}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        out["raycluster.yaml"][group["groupName"]] = {
            "CPU": _quantity(limits["cpu"]),
            "memory": _quantity(limits["memory"]) * 0.7,  # the rest is the object store (Ray's default)
            "GPU": _quantity(limits.get("nvidia.com/gpu", 0)),
        }
    return out


def test_every_jobs_workers_trials_and_writers_fit_a_node_type(monkeypatch):
    """What each cluster job asks Ray for per worker, trial and shard writer, memory included, is
    offered by some node type of every cluster: otherwise the job would be refused there."""
    monkeypatch.setenv("CTRAY_BUCKET", "s3://my-bucket")
    ingest = load_config(IngestConfig, REPO / "jobs" / "ingest.yaml")
    sweep = load_config(SweepConfig, REPO / "jobs" / "sweep-ctfm.yaml")
    base = load_config(PretrainConfig, sweep.base, sweep.overrides)
    shapes = {
        "ingest shard writer": ingest.writer_shape(),
        "sweep trial": sweep.trial_resources(),
        "sweep trial's worker": base.scaling.worker_bundle(),
    }
    assert shapes["ingest shard writer"]["memory"] >= 4 * 2**30  # the default max_voxels: 2^29
    for cluster, types in _node_types().items():
        for what, shape in shapes.items():
            assert any(all(t.get(k, 0) >= v for k, v in shape.items()) for t in types.values()), (cluster, what)
    # a node type without memory (GCP's launcher states none of its own) offers no writer a place
    gcp = _node_types()["gcp.yaml"]
    stripped = {t: {k: v for k, v in r.items() if k != "memory"} for t, r in gcp.items()}
    writer = shapes["ingest shard writer"]
    assert not any(all(t.get(k, 0) >= v for k, v in writer.items()) for t in stripped.values())
