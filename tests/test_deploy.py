"""deploy/: the manifests parse, agree with each other and with the code, and keep the cluster closed.

Offline and fast: no docker, kubectl or network. The RayCluster and RayJob validate strictly (unknown fields are
errors) against KubeRay v1.7.0's own CRD schemas, vendored in tests/fixtures (``kuberay_schema``), and are checked for
the values this project relies on; the cluster-launcher YAML goes through Ray's own ``prepare_config`` +
``validate_config`` (``ray/autoscaler/ray-schema.json``), as ``ray up`` does before it talks to the cloud.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from kuberay_schema import FILES, crd_digest, recorded_digests, strict_errors

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
LAUNCHER = DEPLOY / "cluster-launcher.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
# A Ray auth token (``openssl rand -hex 32``, ``ray get-auth-token``) is 64 hex characters.
TOKEN_LIKE = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])")


@functools.cache
def load_docs(path: Path) -> list[dict]:
    """Parsed once per session; callers copy before they change anything."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kuberay_objects() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def launcher() -> dict:
    return load_docs(LAUNCHER)[0]


def one(kind: str) -> dict:
    found = [d for d in kuberay_objects() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/kuberay, found {len(found)}"
    return found[0]


def cluster_specs() -> dict[str, dict]:
    """Every Ray cluster spec we ship: the RayCluster's and the one the RayJob creates."""
    return {"RayCluster": one("RayCluster")["spec"], "RayJob": one("RayJob")["spec"]["rayClusterSpec"]}


def pod_templates(spec: dict) -> dict[str, dict]:
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])})
    return pods


def mounts_of(pod: dict) -> dict[str, dict]:
    """volume name -> (volume, mountPath) of the Ray container (the first one, as KubeRay assumes)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {
        m["name"]: {**volumes[m["name"]], "mountPath": m["mountPath"]} for m in pod["containers"][0]["volumeMounts"]
    }


def configmap_text() -> str:
    return one("ConfigMap")["data"]["config.yaml"]


def built_image() -> str:
    """The tag the Dockerfile's documented build command gives the image."""
    match = re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert match, "deploy/Dockerfile must document its build command (docker build -f deploy/Dockerfile -t IMAGE .)"
    return match.group(1)


# --- every file --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: no YAML mapping"
    if path.parent == KUBERAY:
        for d in docs:
            assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), f"{path}: {d}"


def test_expected_kuberay_objects() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in kuberay_objects()}
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")} <= kinds
    assert {("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "PersistentVolumeClaim")} <= kinds
    for d in kuberay_objects():
        if d["apiVersion"].startswith("ray.io/"):
            assert d["apiVersion"] == "ray.io/v1", d["metadata"]["name"]


def test_no_file_under_deploy_holds_a_token() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / ".dockerignore"]
    leaks = [f"{p.relative_to(ROOT)}: {m.group()[:8]}..." for p in files for m in TOKEN_LIKE.finditer(p.read_text())]
    assert not leaks, f"token-like 64-hex strings: {leaks}"
    placeholder = one("Secret").get("stringData", {}).get("auth_token", "")
    assert not placeholder.strip(), "secret.yaml is a template: its auth_token must stay an empty placeholder"


# --- KubeRay's CRD schema -----------------------------------------------------------------------------------------


def ray_objects() -> list[dict]:
    return [d for d in kuberay_objects() if d["kind"] in FILES]


@pytest.mark.parametrize("doc", ray_objects(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_ray_objects_validate_strictly_against_kuberays_crd(doc: dict) -> None:
    assert strict_errors(doc) == []  # a RayJob's rayClusterSpec is checked through the RayJob schema


def _worker_group(doc: dict) -> dict:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return spec["workerGroupSpecs"][0]


def _rename(group: dict, old: str, new: str) -> None:
    group[new] = group.pop(old)


BREAKAGES = {  # a change to the GPU worker group -> (JSON path under the group, what the schema says)
    "misspelt minReplicas": (lambda g: _rename(g, "minReplicas", "minReplica"), "", "'minReplica' was unexpected"),
    "maxReplicas under template": (
        lambda g: g["template"].update(maxReplicas=g.pop("maxReplicas")),
        ".template",
        "'maxReplicas' was unexpected",
    ),
    "replicas as a word": (lambda g: g.update(replicas="two"), ".replicas", "'two' is not of type 'integer'"),
    "misspelt container field": (
        lambda g: _rename(g["template"]["spec"]["containers"][0], "imagePullPolicy", "imagePullPolice"),
        ".template.spec.containers[0]",
        "'imagePullPolice' was unexpected",
    ),
    "GPU limit not a quantity": (
        lambda g: g["template"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "one"}),
        ".template.spec.containers[0].resources.limits['nvidia.com/gpu']",
        "'one' does not match",
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("kind", sorted(FILES))
def test_strict_schema_refuses_a_broken_copy(kind: str, breakage: str) -> None:
    doc = copy.deepcopy(one(kind))
    change, path, message = BREAKAGES[breakage]
    group = _worker_group(doc)
    change(group)
    prefix = "$.spec.rayClusterSpec" if kind == "RayJob" else "$.spec"
    errors = strict_errors(doc)
    assert any(e.startswith(f"{prefix}.workerGroupSpecs[0]{path}: ") and message in e for e in errors), errors


def test_strict_schema_refuses_an_unknown_auth_mode() -> None:
    doc = copy.deepcopy(one("RayCluster"))
    doc["spec"]["authOptions"]["mode"] = "Token"
    assert strict_errors(doc) == ["$.spec.authOptions.mode: 'Token' is not one of ['disabled', 'token']"]


@pytest.mark.parametrize("kind", sorted(FILES))
def test_vendored_crds_are_the_recorded_kuberay_files(kind: str) -> None:
    assert crd_digest(kind) == recorded_digests()[FILES[kind].removesuffix(".gz")]


# --- the RayJob and its config -----------------------------------------------------------------------------------


def test_rayjob_entrypoint_is_a_pipeline_command_reading_the_mounted_config() -> None:
    from pipeline.cli import build_parser

    job = one("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline"], argv
    try:
        args = build_parser().parse_args(argv[3:])
    except SystemExit as exc:  # argparse exits on an unknown subcommand or option
        pytest.fail(f"python -m pipeline rejects the RayJob entrypoint {argv[3:]} (exit {exc.code})")
    assert args.command == "iterate" and args.rounds == 3 and args.run

    # The config path is where the ConfigMap's key lands on the head pod, where the driver runs.
    cm = one("ConfigMap")
    head = mounts_of(pod_templates(job["rayClusterSpec"])["head"])
    (config_mount,) = [m for m in head.values() if m.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    assert "items" not in config_mount["configMap"], "items would rename the ConfigMap keys"
    assert args.config in {f"{config_mount['mountPath'].rstrip('/')}/{key}" for key in cm["data"]}
    assert args.config == f"{config_mount['mountPath'].rstrip('/')}/config.yaml"


def test_rayjob_cleans_up_and_retries() -> None:
    job = one("RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
    assert isinstance(job["backoffLimit"], int) and job["backoffLimit"] >= 0
    assert job.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
    assert ("rayClusterSpec" in job) != ("clusterSelector" in job)


def test_rayjob_cluster_is_the_raycluster() -> None:
    specs = cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"


def test_configmap_config_loads_and_targets_the_cluster(tmp_path: Path) -> None:
    from pipeline.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(configmap_text())
    cfg = load_config(path)  # the shard paths exist only on the cluster: loading does not look for them
    assert cfg.storage == "/mnt/runs"
    assert cfg.data.prepare_digits.startswith(cfg.storage + "/")
    for shards in (cfg.data.labeled, cfg.data.unlabeled, cfg.data.test):
        assert all(s.startswith(cfg.data.prepare_digits + "/") for s in shards), shards
    res = cfg.resources
    assert res.use_gpu and res.gpus_per_label_actor >= 1 and res.address == ""


def test_configmap_config_is_the_digits_recipe_otherwise(tmp_path: Path) -> None:
    """Only storage, data locations, name and resources may differ from configs/digits.yaml."""
    from pipeline.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(configmap_text())
    cluster, local = load_config(path).to_dict(), load_config(ROOT / "configs" / "digits.yaml").to_dict()
    for tree in (cluster, local):
        for key in ("name", "storage", "resources"):
            tree.pop(key)
        for key in ("labeled", "unlabeled", "test", "val", "prepare_digits"):
            tree["data"].pop(key)
    assert cluster == local


def test_launcher_config_is_the_configmap_config() -> None:
    repo_dirs = [ROOT / local for local in launcher()["file_mounts"].values() if local.startswith("./")]
    texts = [(d / "config.yaml").read_text() for d in repo_dirs if (d / "config.yaml").is_file()]
    assert texts == [configmap_text()], "deploy/launcher/config.yaml must equal the ConfigMap's config.yaml"


# --- cluster: auth, exposure, GPUs, storage ----------------------------------------------------------------------


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_token_auth_from_our_secret(owner: str) -> None:
    spec = cluster_specs()[owner]
    auth = spec.get("authOptions", {})
    assert auth.get("mode") == "token"
    assert auth.get("secretName") == one("Secret")["metadata"]["name"]
    assert "auth_token" in one("Secret").get("stringData", one("Secret").get("data", {}))


def test_nothing_is_exposed_outside_the_cluster() -> None:
    for d in kuberay_objects():
        assert d["kind"] != "Ingress", d["metadata"]["name"]
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
    for owner, spec in cluster_specs().items():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", owner
        assert head.get("enableIngress", False) is False, owner
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", owner
        for name, pod in pod_templates(spec).items():
            assert not pod.get("hostNetwork"), f"{owner}/{name}"
            ports = [p for c in pod["containers"] for p in c.get("ports", [])]
            assert not any("hostPort" in p for p in ports), f"{owner}/{name}"


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_gpu_workers_autoscale_from_zero(owner: str) -> None:
    spec = cluster_specs()[owner]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray_version()
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1, g["groupName"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, g["groupName"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head should run the driver, not tasks"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_every_node_mounts_the_shared_runs_volume_at_the_config_storage(owner: str, tmp_path: Path) -> None:
    from pipeline.config import load_config

    pvc = one("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    path = tmp_path / "config.yaml"
    path.write_text(configmap_text())
    storage = load_config(path).storage
    for name, pod in pod_templates(cluster_specs()[owner]).items():
        claims = {
            m["mountPath"]: m["persistentVolumeClaim"]["claimName"]
            for m in mounts_of(pod).values()
            if "persistentVolumeClaim" in m
        }
        assert claims.get(storage) == pvc["metadata"]["name"], f"{owner}/{name} mounts {claims}"


# --- image ---------------------------------------------------------------------------------------------------------


def ray_version() -> str:
    import ray

    return ray.__version__


def test_dockerfile_base_image_matches_installed_ray_and_python() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert len(froms) == 1, froms
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", froms[0])
    assert match, f"expected Ray's GPU image rayproject/ray:X.Y.Z-py3NN-gpu, got {froms[0]}"
    assert match.group(1) == ray_version()
    assert int(match.group(2)) == sys.version_info.minor
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.fullmatch(r">=3\.(\d+)", requires) and int(match.group(2)) >= int(requires.split(".")[1])


def test_dockerfile_torch_pins_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if d.startswith(("torch==", "torchvision==")))
    assert set(pins) == {"torch", "torchvision"}
    installed = dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", DOCKERFILE.read_text()))
    assert installed == pins


def test_every_node_runs_the_built_image() -> None:
    image = built_image()
    for owner, spec in cluster_specs().items():
        for name, pod in pod_templates(spec).items():
            assert [c["image"] for c in pod["containers"]] == [image], f"{owner}/{name}"
    assert one("Pod")["spec"]["containers"][0]["image"] == image
    assert launcher()["docker"]["image"] == image
    assert f"docker build -f deploy/Dockerfile -t {image} ." in (DEPLOY / "README.md").read_text()


# --- cluster launcher --------------------------------------------------------------------------------------------


def prepared_launcher(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # fills AWS defaults from Ray's defaults.yaml; no cloud calls
    validate_config(prepared)  # jsonschema against ray-schema.json, plus head type / min_workers checks
    return prepared


def test_launcher_passes_rays_validation() -> None:
    import jsonschema

    config = launcher()
    prepared = prepared_launcher(config)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["min_wrokers"] = 0  # the validator is live: a typo is refused
    with pytest.raises(jsonschema.ValidationError):
        prepared_launcher(broken)


def test_launcher_keeps_the_dashboard_local_and_auth_on() -> None:
    config = launcher()
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmds
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);?\s", cmds).group(1)
        assert any(token_path.startswith(remote.rstrip("/") + "/") for remote in config["file_mounts"]), token_path
    assert "RAY_AUTH_TOKEN=" not in LAUNCHER.read_text(), "the token comes from a mounted file, never inline"


def test_launcher_gpu_workers_scale_from_zero() -> None:
    config = launcher()
    types = config["available_node_types"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node.get("min_workers", 0) == 0 and node["max_workers"] >= 1, name
        assert node["resources"].get("GPU", 0) >= 1, name
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
