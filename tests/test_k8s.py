"""KubeRay manifests (configs/k8s/): well-formed, and the same image, pins, job and serve application as
the rest of the project. Fast, offline: no cluster, no network.

What checks what (docs/CLUSTER.md says the same):
- Every Kubernetes part -- object metadata, each pod template (head, workers), the PersistentVolumeClaim --
  is validated against Kubernetes' own OpenAPI schemas, strict (unknown fields are errors), as the
  `kubernetes-validate` package ships them (KUBE_VERSION below).
- KubeRay's own fields (spec, headGroupSpec, workerGroupSpecs, RayJob / RayService fields) are checked
  against KUBERAY_FIELDS below: a hand-written subset of KubeRay's ray.io/v1 API (field names, types,
  what lorafleet requires), transcribed from KubeRay's API reference. It is NOT KubeRay's CRD schema: no
  package this project can install ships that, so the CRDs' openAPIV3Schema is not vendored. A real
  cluster validates against the CRDs themselves: `kubectl apply --dry-run=server -f configs/k8s/`.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from helpers import REPO

K8S = REPO / "configs" / "k8s"
KUBE_VERSION = "1.32.0"  # kubernetes-validate's schema folder v<KUBE_VERSION>-local-strict
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
MANIFESTS = sorted(K8S.glob("*.yaml"))

# --- Kubernetes' schemas (kubernetes-validate) -----------------------------------------------------

K8S_API = "https://kubernetes.io/api/"
POD_TEMPLATE = {"$ref": f"{K8S_API}podtemplatespec/v1"}
OBJECT_META = {"$ref": f"{K8S_API}_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def _schema_dir() -> Path:
    schemas = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return Path(str(schemas / f"v{KUBE_VERSION}-local-strict"))


@lru_cache(maxsize=1)
def k8s_registry() -> Registry:
    """Kubernetes' definitions and the PodTemplateSpec schema, addressable by their $id."""
    import json

    folder = _schema_dir()
    docs = [json.loads((folder / name).read_text()) for name in ("_definitions.json", "podtemplatespec-v1.json")]
    return Registry().with_resources((doc["$id"], Resource.from_contents(doc)) for doc in docs)


def k8s_schema(kind: str, api_version: str) -> dict[str, Any]:
    """Kubernetes' strict schema of a core object (e.g. PersistentVolumeClaim, v1)."""
    import json

    group = api_version.split("/")[0].split(".")[0] if "/" in api_version else ""
    name = f"{kind.lower()}-{group + '-' if group else ''}{api_version.split('/')[-1]}.json"
    return json.loads((_schema_dir() / name).read_text())


# --- KubeRay's fields: a hand-written subset of ray.io/v1, NOT the CRD schema (see the module doc) --------

STR, BOOL = {"type": "string"}, {"type": "boolean"}
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}  # Go map[string]string: "0", not 0
ANY_OBJ = {"type": "object"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


HEAD_GROUP = _obj({"rayStartParams": STR_MAP, "template": POD_TEMPLATE, "enableIngress": BOOL,
                   "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "headService": ANY_OBJ},
                  ("template",))
WORKER_GROUP = _obj({"groupName": STR, "replicas": INT32, "minReplicas": INT32, "maxReplicas": INT32,
                     "numOfHosts": INT32, "idleTimeoutSeconds": INT32, "rayStartParams": STR_MAP,
                     "template": POD_TEMPLATE, "scaleStrategy": ANY_OBJ, "suspend": BOOL},
                    ("groupName", "template"))
AUTOSCALER = _obj({"idleTimeoutSeconds": INT32, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                   "version": {"enum": ["v1", "v2"]}, "image": STR, "imagePullPolicy": STR, "resources": ANY_OBJ,
                   "env": {"type": "array"}, "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
                   "securityContext": ANY_OBJ})
CLUSTER_SPEC = _obj({"rayVersion": STR, "authOptions": _obj({"mode": {"enum": ["disabled", "token"]}}),
                     "enableInTreeAutoscaling": BOOL, "autoscalerOptions": AUTOSCALER, "headGroupSpec": HEAD_GROUP,
                     "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP}, "headServiceAnnotations": STR_MAP,
                     "suspend": BOOL, "managedBy": STR, "gcsFaultToleranceOptions": ANY_OBJ},
                    ("headGroupSpec", "rayVersion"))
KUBERAY_FIELDS: dict[str, dict[str, Any]] = {
    "RayCluster": CLUSTER_SPEC,
    "RayJob": _obj({"entrypoint": STR, "runtimeEnvYAML": STR, "rayClusterSpec": CLUSTER_SPEC,
                    "clusterSelector": STR_MAP,
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "shutdownAfterJobFinishes": BOOL, "ttlSecondsAfterFinished": INT32,
                    "activeDeadlineSeconds": {**INT32, "minimum": 1}, "backoffLimit": INT32, "suspend": BOOL,
                    "submitterPodTemplate": POD_TEMPLATE, "submitterConfig": ANY_OBJ, "metadata": STR_MAP,
                    "jobId": STR, "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                    "entrypointResources": STR, "deletionStrategy": ANY_OBJ, "managedBy": STR},
                   ("entrypoint", "rayClusterSpec")),
    "RayService": _obj({"serveConfigV2": STR, "rayClusterConfig": CLUSTER_SPEC, "upgradeStrategy": ANY_OBJ,
                        "serviceUnhealthySecondThreshold": INT32, "deploymentUnhealthySecondThreshold": INT32,
                        "excludeHeadPodFromServeSvc": BOOL, "serveService": ANY_OBJ},
                       ("serveConfigV2", "rayClusterConfig")),
}


def manifest_problems(doc: dict[str, Any]) -> list[str]:
    """Every schema problem of one manifest, as 'path: message' (empty: valid)."""
    kind = doc.get("kind")
    if kind in KUBERAY_FIELDS:
        schema = _obj({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": OBJECT_META,
                       "spec": KUBERAY_FIELDS[kind]}, ("apiVersion", "kind", "metadata", "spec"))
    else:
        schema = k8s_schema(str(kind), str(doc.get("apiVersion")))
    validator = jsonschema.Draft202012Validator(schema, registry=k8s_registry())
    errors = validator.iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors)


# --- reading the manifests and the project files they must agree with ------------------------------

def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def dockerfile() -> dict[str, Any]:
    text = (K8S / "Dockerfile").read_text()
    return {"from": re.search(r"(?m)^FROM\s+(\S+)", text).group(1),
            "workdir": re.search(r"(?m)^WORKDIR\s+(\S+)", text).group(1),
            "copied": re.findall(r"(?m)^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text),
            "extras": re.search(r'pip install [^\n]*-e "\.\[([^\]]+)\]"', text).group(1)}


def pyproject_pin(package: str) -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"]+)"', text).group(1)


# --- tests --------------------------------------------------------------------------------------------

def test_manifests_are_one_document_each_of_the_expected_kinds():
    kinds = {}
    for path in MANIFESTS:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: one object per file"
        kinds[docs[0]["kind"]] = path.name
    assert set(RAY_KINDS) <= set(kinds), kinds
    assert "PersistentVolumeClaim" in kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_schemas(path: Path):
    assert manifest_problems(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"].__setitem__("workerGroupSpec", []), "workerGroupSpec' was unexpected"),  # KubeRay typo
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "0 is not of type 'string'"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolcy", "x"),
     "imagePullPolcy' was unexpected"),  # a pod field: Kubernetes' schema
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
     .__setitem__("limit", {}), "'limit' was unexpected"),
    (lambda d: d["metadata"].__setitem__("labels", {"a": 1}), "1 is not of type 'string'"),  # ObjectMeta
])
def test_schema_checks_catch_bad_fields(mutate, expected):
    doc = copy.deepcopy(load("raycluster.yaml"))
    mutate(doc)
    problems = manifest_problems(doc)
    assert any(expected in p for p in problems), problems


def test_image_and_pins_are_cluster_yaml_s():
    """The manifests' image is configs/k8s/Dockerfile's build: cluster.yaml's image, with its setup baked in."""
    launcher = yaml.safe_load((REPO / "cluster.yaml").read_text())
    base = launcher["docker"]["image"]
    docker = dockerfile()
    assert docker["from"] == base
    setup = " ".join(launcher["setup_commands"])
    assert re.search(r'pip install -q -e "\$HOME/lorafleet\[([^\]]+)\]"', setup).group(1) == docker["extras"]
    synced = {Path(p).name for p in launcher["file_mounts"].values()} - {"auth_token"}
    assert synced <= {w for line in docker["copied"] for w in line.split() if not w.startswith("./")}
    ray_pin = pyproject_pin("ray")
    version = re.search(r'(?m)^version = "([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    base_tag = base.split(":")[1]
    assert base_tag.startswith(f"{ray_pin}-")
    for name in ("raycluster.yaml", "rayjob-finetune.yaml", "rayservice.yaml"):
        spec = cluster_spec(load(name))
        assert spec["rayVersion"] == ray_pin, name
        images = {c["image"] for c in containers(spec)}
        assert len(images) == 1 and next(iter(images)).endswith(f"/lorafleet:{version}-ray{base_tag}"), (name, images)


def test_the_cluster_spec_is_the_same_in_every_manifest():
    specs = {name: cluster_spec(load(name)) for name in ("raycluster.yaml", "rayjob-finetune.yaml", "rayservice.yaml")}
    first = specs["raycluster.yaml"]
    for name, spec in specs.items():
        assert spec == first, f"{name}'s cluster spec differs from raycluster.yaml's"


def test_rayjob_runs_jobs_finetune_with_a_shipped_config(tmp_path):
    from lorafleet.config import load_config

    job = load("rayjob-finetune.yaml")
    app_dir = dockerfile()["workdir"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{app_dir}/jobs/finetune.py"
    in_repo = lambda p: REPO / Path(p).relative_to(app_dir)  # noqa: E731 - the image's copy of the repo
    assert in_repo(argv[1]).is_file()
    config = in_repo(argv[argv.index("--config") + 1])
    cfg = load_config(config, home=tmp_path)  # the job's config loads through the real schema
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert sum(g["maxReplicas"] for g in workers) >= cfg.scaling.num_workers
    for group in workers:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert (int(limits.get("nvidia.com/gpu", 0)) >= 1) == cfg.scaling.use_gpu
        assert float(limits["cpu"]) >= cfg.scaling.cpus_per_worker


def test_rayservice_serves_the_shipped_serve_application():
    from lorafleet.config.serve import load_settings

    service = load("rayservice.yaml")
    serve_config = service["spec"]["serveConfigV2"]
    assert isinstance(serve_config, str)  # KubeRay takes the Serve config as a YAML string
    apps = yaml.safe_load(serve_config)["applications"]
    assert apps == yaml.safe_load((REPO / "configs" / "gpu" / "serve-8b.yaml").read_text())["applications"]
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    for key in ("name", "route_prefix", "import_path"):
        assert apps[0][key] == local[key], key
    settings = load_settings(apps[0]["args"], "rayservice serveConfigV2")
    if settings.accelerator == "gpu":
        workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers)


def test_every_pod_mounts_the_shipped_shared_volume():
    pvc = load("storage.yaml")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # rank 0, the driver and serving replicas share it
    for name in ("raycluster.yaml", "rayjob-finetune.yaml", "rayservice.yaml"):
        spec = cluster_spec(load(name))
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert claims == {pvc["metadata"]["name"]}, name
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            mount = next(m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "shared")
            assert env["LORAFLEET_HOME"].startswith(mount + "/") and env["HF_HOME"].startswith(mount + "/")
