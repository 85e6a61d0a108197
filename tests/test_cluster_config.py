"""cluster.yaml and the cluster commands the docs give, checked against memscore.

Each test is a promise that a wrong edit of cluster.yaml, of a page that tells a user what to
type, or of memscore itself would break:

- cluster.yaml passes the checks ``ray up`` makes before its first AWS call (Ray's own
  ``prepare_config`` and ``validate_config``, run offline), and each ``node_config``, which Ray
  hands to EC2's RunInstances unchecked, is a request botocore's model of EC2 accepts;
- every node runs the Ray version pyproject.toml pins, memscore from this checkout, and the
  PyPI packages memscore's default weights are read from;
- no model actor memscore plans fits on the head, and the documented score job plans its GPU
  actors on cluster.yaml's cluster even before a GPU node is up (memscore's own planning code);
- the dashboard and job API stay on the head's loopback (docs/cluster.md says so);
- every ``ray``, ``serve`` and ``python jobs/...`` command in README.md, docs/ and the job
  scripts' docstrings parses with the parser of the program it names (Ray's, Ray Serve's,
  memscore's own), and the files it names exist.

Nothing here reads credentials, calls AWS or starts Ray.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
import shlex
import sysconfig
from pathlib import Path

import click
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from memscore.config import EvaluateConfig, FinetuneConfig, ScoreConfig, TrainSAEConfig, from_args
from memscore.feature_analysis.config import FeaturesConfig
from memscore.models import WeightsNotFoundError, get_model_weights, list_models
from memscore.stages.pipeline import plan_model_actors

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
DASHBOARD_PORT = 8265  # Ray's dashboard and job API
#: g5 (A10G) and g6 (L4) sizes with one GPU: docs/cluster.md's "--num-gpus N (at most the
#: worker count)" holds for these.
SINGLE_GPU = re.compile(r"^g(5|6)\.(|2|4|8|16)xlarge$")
#: node_config keys Ray consumes itself before calling RunInstances.
RAY_NODE_CONFIG_KEYS = {"SubnetIds"}
#: The config each job script's parser fills (jobs/<name>.py).
JOB_CONFIGS = {
    "score": ScoreConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "train_sae": TrainSAEConfig,
    "features": FeaturesConfig,
}


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` checks before its first AWS call; returns the config with defaults merged."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


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


def default_weights_distributions() -> set[str]:
    """The installed distributions that memscore's registered default weights files live in
    (resmem's model.pt is in the resmem wheel, ...), found from the files themselves."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    owners = importlib.metadata.packages_distributions()
    found = set()
    for name in list_models():
        try:
            path = Path(get_model_weights(name).DEFAULT.value.path()).resolve()
        except WeightsNotFoundError:  # no published weights, or a model hub's cache
            continue
        if path.is_relative_to(site):
            found.update(owners[path.relative_to(site).parts[0]])
    return found


# ------------------------------------------------------------ the commands the docs give
def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of each shell command shown in ``path``: the fenced code blocks
    of a Markdown page, the 4-space-indented lines of a job script's docstring; lines ending
    in ``\\`` joined to the next."""
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        fences = [i for i, line in enumerate(lines) if line.lstrip().startswith("```")]
        shown = [
            i
            for start, end in zip(fences[::2], fences[1::2])
            if lines[start].strip() in ("```", "```bash", "```sh")
            for i in range(start + 1, end)
        ]
    else:
        shown = [
            i for i, line in enumerate(lines[: _docstring_end(lines)]) if line.startswith("    ")
        ]
    commands, pending, first = [], "", None
    for i in shown:
        text = lines[i].strip()
        if first is None:
            first = i + 1
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        commands.append((first, pending + text))
        pending, first = "", None
    return commands


def _docstring_end(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines[1:], 1) if line.rstrip().endswith('"""'))


def commands_in(path: Path) -> list[tuple[str, list[str]]]:
    """(where, words) of each ``ray``, ``serve`` or ``python jobs/...`` command in ``path``."""
    found = []
    for line, text in shell_lines(path):
        if not re.search(r"(^|[;&|]\s*)(ray|serve|python) ", text):
            continue  # (a block may be a diagram, not shell)
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words = list(lexer)
        command: list[str] = []
        for word in words + [";"]:
            if word not in (";", "&&", "||", "|"):
                command.append(word)
                continue
            if command[:1] in (["ray"], ["serve"]) or (
                command[:1] == ["python"] and command[1:2] and command[1].startswith("jobs/")
            ):
                found.append((f"{path.relative_to(ROOT)}:{line}", command))
            command = []
    return found


DOCUMENTED = [
    c
    for page in [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "jobs").glob("*.py")),
    ]
    for c in commands_in(page)
]


def parse_click(program: click.Group, words: list[str]) -> click.Context:
    """``words`` (a command line) parsed by ``program``, its click CLI, which runs nothing: an
    unknown subcommand or option, or a missing argument, raises ``UsageError``."""
    command, path, words = program, words[:1], words[1:]
    while isinstance(command, click.Group):
        if not words or words[0] not in command.commands:
            raise click.UsageError(f"{' '.join(path)} has no command {words[:1]}")
        name, *words = words
        command, path = command.commands[name], path + [name]
    return command.make_context(" ".join(path), list(words))


def parse_job_script(words: list[str]):
    """``python jobs/NAME.py ARGS`` -> the validated config that jobs/NAME.py would run with,
    parsed by the script's own parser (the one `memscore NAME` has)."""
    script = ROOT / words[1]
    assert script.is_file(), f"{words[1]} does not exist"
    spec = importlib.util.spec_from_file_location(f"job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        args = module.parse_args(words[2:])
    except SystemExit as exc:  # argparse has printed the reason to stderr
        raise AssertionError(f"{script.name} refuses {words[2:]} (exit {exc.code})") from None
    return from_args(args, JOB_CONFIGS[script.stem]).validated()


def documented_score_jobs() -> list[ScoreConfig]:
    """The configs of the scoring jobs the docs tell a user to submit to the cluster."""
    jobs = []
    for _, words in DOCUMENTED:
        if words[:3] == ["ray", "job", "submit"]:
            entrypoint = words[words.index("--") + 1 :]
            if entrypoint[1:2] == ["jobs/score.py"]:
                jobs.append(parse_job_script(entrypoint))
    return jobs


# ------------------------------------------------------------------------------ the file
def test_cluster_yaml_passes_the_checks_ray_up_makes():
    ray_validate(load())


def test_node_configs_are_run_instances_requests_ec2_accepts():
    import botocore.session
    from botocore.validate import ParamValidator

    shape = (
        botocore.session.get_session()
        .get_service_model("ec2")
        .operation_model("RunInstances")
        .input_shape
    )
    for name, node_type in load()["available_node_types"].items():
        request = {
            k: v for k, v in node_type["node_config"].items() if k not in RAY_NODE_CONFIG_KEYS
        }
        request.update(MinCount=1, MaxCount=1)  # Ray adds these
        assert ParamValidator().validate(request, shape).generate_report() == "", name


def test_every_node_runs_the_ray_version_pyproject_pins():
    # Ray needs one version on every node, and pip installing memscore on a node must keep
    # the image's Ray: the image's version has to be one pyproject.toml allows.
    config = load()
    docker = config["docker"]
    images = {
        docker["image"],
        docker.get("head_image", docker["image"]),
        docker.get("worker_image", docker["image"]),
    }
    for node_type in config["available_node_types"].values():
        images.add(node_type.get("docker", {}).get("worker_image", docker["image"]))
    assert len(images) == 1, f"one image on every node, got {images}"
    (image,) = images
    repo, tag = image.split(":")
    assert repo == "rayproject/ray", "rayproject/ray, not the deprecated rayproject/ray-ml"
    version = re.match(r"\d+\.\d+\.\d+", tag)
    assert version, f"{tag!r}: a rayproject/ray tag starts with the Ray version"
    pinned = requirements()["ray"]
    assert pinned.specifier.contains(version.group()), f"{image} is outside pyproject's {pinned}"


def test_setup_installs_this_checkout_and_the_default_weights_packages():
    config = load()
    checkout = next(
        remote for remote, local in config["file_mounts"].items() if local in (".", "./")
    )
    assert ".gitignore" in config["rsync_filter"], ".venv and outputs must not be copied"
    pips = [c for c in config["setup_commands"] if c.lstrip().startswith("pip install")]
    assert any(checkout in c.split() for c in pips), "memscore installed from the checkout"
    pins = {}  # name -> version specifier, of each "name==version" pip is given
    for command in pips:
        for word in shlex.split(command):
            try:
                requirement = Requirement(word)
            except InvalidRequirement:  # a path, an option
                continue
            if requirement.specifier:
                pins[requirement.name] = requirement.specifier
    weights = default_weights_distributions()
    assert weights, "no default weights file found in an installed package"
    required = requirements()
    for name in sorted(weights):
        assert name in pins, f"{name} (default weights) is not pip installed in setup_commands"
        (exact,) = [s for s in pins[name] if s.operator == "=="]
        assert required[name].specifier.contains(exact.version), (
            f"{name}{pins[name]} is outside pyproject's {required[name]}"
        )


def test_the_dashboard_and_job_api_stay_on_the_heads_loopback():
    config = load()
    prepared = ray_validate(config)  # without the file's own commands Ray binds 0.0.0.0
    commands = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    assert "0.0.0.0" not in commands and "--dashboard-host=::" not in commands
    # and no rule the file adds opens more than SSH to the world
    for permission in config["provider"].get("security_group", {}).get("IpPermissions", []):
        world = [r.get("CidrIp") for r in permission.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in permission.get("Ipv6Ranges", [])
        ]
        if {"0.0.0.0/0", "::/0"} & set(world):
            assert (permission.get("FromPort"), permission.get("ToPort")) == (22, 22), permission


# ------------------------------------------------------------- memscore's plan on it
def test_no_model_actor_memscore_plans_fits_on_the_head():
    config = load()
    head = ray_validate(config)["available_node_types"][config["head_node_type"]]["resources"]
    # Undeclared, Ray would give the head its instance's vCPUs.
    assert "CPU" in head, "the head declares its CPUs"
    gpu_nodes = sum(
        t.get("max_workers", 0)
        for t in config["available_node_types"].values()
        if SINGLE_GPU.match(t["node_config"]["InstanceType"])
    )
    for job in documented_score_jobs() + [ScoreConfig("m", output="o").validated()]:
        for gpus_up in range(gpu_nodes + 1):
            plan = plan_model_actors(job, gpus_up, autoscaling=True)
            assert plan["num_cpus"] > head["CPU"], (job.num_gpus, gpus_up, plan)


def test_the_documented_score_job_plans_a_gpu_actor_per_gpu_node_before_they_start():
    config = load()
    gpu_types = [
        t
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"]
        and t["node_config"]["InstanceType"].startswith(("g", "p"))
    ]
    assert all(SINGLE_GPU.match(t["node_config"]["InstanceType"]) for t in gpu_types), (
        "docs/cluster.md counts one GPU per GPU node"
    )
    gpu_nodes = sum(t["max_workers"] for t in gpu_types)
    jobs = documented_score_jobs()
    assert jobs, "README.md and docs/ show a `ray job submit ... jobs/score.py` command"
    for job in jobs:
        assert job.num_gpus, "on cluster.yaml's cluster, a job without --num-gpus scores on a CPU"
        assert job.num_gpus <= gpu_nodes, f"--num-gpus {job.num_gpus} > {gpu_nodes} GPU nodes"
        # the GPU nodes scale from zero: the pending GPU actors are what starts them
        for gpus_up in range(int(job.num_gpus) + 1):
            plan = plan_model_actors(job, gpus_up, autoscaling=True)
            assert (plan["actors"], plan["num_gpus"], plan["use_gpu"]) == (job.num_gpus, 1, True), (
                gpus_up,
                plan,
            )
    # the docs' warning: without --num-gpus, a job that starts before any GPU node is up
    # plans one CPU actor
    cpu_plan = plan_model_actors(ScoreConfig("m", output="o").validated(), 0, autoscaling=True)
    assert (cpu_plan["actors"], cpu_plan["use_gpu"]) == (1, False)


# --------------------------------------------------------------- the commands the docs give
def test_the_docs_show_the_cluster_commands():
    shown = {tuple(words[:3]) for _, words in DOCUMENTED}
    for command in [
        ("ray", "up", "cluster.yaml"),
        ("ray", "down", "cluster.yaml"),
        ("ray", "job", "submit"),
        ("serve", "deploy", "serve_config.yaml"),
    ]:
        assert command in shown, command


@pytest.mark.parametrize("where, words", DOCUMENTED, ids=[w for w, _ in DOCUMENTED])
def test_a_documented_command_parses_and_its_files_exist(where, words):
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    if words[0] == "python":
        parse_job_script(words)
        return
    context = parse_click({"ray": ray_cli, "serve": serve_cli}[words[0]], words)
    params = context.params
    for name in ("cluster_config_file", "config_or_import_path"):
        value = params.get(name)
        if value and value.endswith((".yaml", ".yml")):
            assert (ROOT / value).is_file(), f"{where}: {value} does not exist"
    if words[:3] == ["ray", "job", "submit"]:
        assert params["working_dir"] == ".", "the job runs this checkout"
        entrypoint = list(params["entrypoint"])
        assert entrypoint[:1] == ["python"] and entrypoint[1].startswith("jobs/"), entrypoint
        parse_job_script(entrypoint)
