"""cluster/: manifests validate against KubeRay's CRDs, and what they name exists and loads."""

import copy
import functools
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from k3batch.config import load_config
from k3batch.serve.launch import import_attr, load_serve_config

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO.parent / "shared" / "kuberay-crds"
CLUSTER = REPO / "cluster"
MANIFESTS = ["rayjob.yaml", "rayservice.yaml", "raycluster.yaml"]


def strict(schema):
    """Reject unknown fields like `kubectl apply --validate=strict` (CRDs only prune them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def _crds() -> dict:
    """{kind: CRD}, each 1 MB file parsed once (libyaml's loader: PyYAML's own takes ~5 s
    a file)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crds = (yaml.load(path.read_text(), Loader=loader) for path in CRDS.glob("*.yaml"))
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


def crd_schema(kind: str):
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    crd = _crds().get(kind)
    assert crd is not None, f"no CRD for {kind}"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_its_crd(name):
    manifest = yaml.safe_load((CLUSTER / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest, crd_schema(manifest["kind"]))


def test_strict_validation_catches_a_misspelt_field():
    manifest = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(manifest, crd_schema("RayJob"))


def test_rayjob_entrypoint_runs_a_real_config():
    spec = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["k3batch", "run"]
    config = REPO / argv[2]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, overrides)
    assert cfg.output.uri.startswith("s3://") and cfg.resources.num_gpus_per_actor >= 1
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus_per_pod = int(
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert (
        group["maxReplicas"] * gpus_per_pod
        >= cfg.resources.max_actors * cfg.resources.num_gpus_per_actor
    )


def test_rayservice_embeds_configs_serve_yaml_and_its_app_builds():
    spec = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())["spec"]
    embedded = yaml.safe_load(spec["serveConfigV2"])
    assert embedded == yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    loaded = load_serve_config(str(REPO / "configs" / "serve.yaml"))
    for app in loaded["applications"]:
        assert callable(import_attr(app["import_path"]))
    # The GPU worker group holds every GPU deployment at its max replicas.
    args = loaded["applications"][0]["args"]
    wanted = sum(
        g["autoscaling_config"]["max_replicas"] * g["num_gpus"]
        for g in (args["generator"], args["inpaint_generator"], args["upscaler"])
    )
    group = spec["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["maxReplicas"] * gpus >= wanted


def test_serve_beautify_config_builds_both_apps():
    """configs/serve-beautify.yaml: the k3batch app's beautifier points at the ray.serve.llm
    app of the same file, and both applications build (no GPU needed to build)."""
    from k3batch.serve.config import ServeAppConfig

    loaded = load_serve_config(str(REPO / "configs" / "serve-beautify.yaml"))
    k3, llm = loaded["applications"]
    cfg = ServeAppConfig.model_validate(k3["args"])
    assert cfg.beautify is not None
    assert cfg.beautify.base_url.split(":8000", 1)[1].startswith(llm["route_prefix"] + "/")
    served = [c["model_loading_config"]["model_id"] for c in llm["args"]["llm_configs"]]
    assert cfg.beautify.model in served
    for app in (k3, llm):
        assert import_attr(app["import_path"])(app["args"]) is not None


def test_cluster_launcher_config_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and config["head_node_type"] in config["available_node_types"]


def test_every_file_uses_one_image_and_the_dockerfile_copies_what_exists():
    images = set()
    for name in [*MANIFESTS, "aws-gpu.yaml"]:
        images |= set(re.findall(r"image: (\S+)", (CLUSTER / name).read_text()))
    assert len(images) == 1, images
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", dockerfile, flags=re.M):
        for item in src.split():
            assert (REPO / item).exists(), item
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert '".[gpu]"' in dockerfile and "gpu" in extras
